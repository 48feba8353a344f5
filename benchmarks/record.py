"""What `--record` costs: msg/s of a filter recording every connection (bodies on) and 1 in 100,
against the same filter without it, in the same run.

Two filters: the recipient counter (`examples/rcpt_count.py`, mail/rcpt/eom) and the same
reading every header and body chunk (`HeaderBody` below: loadgen checks X-Rcpt-Count). For
each, three milters run at once (`pymilterkit run`, on CPU 0): without `--record`, with
`--record DIR` (sample 1, bodies on) and with `--record-sample 0.01`. `build/loadgen` (CPU 1;
8 connections, 3 recipients, 1 KiB body, unix socket) drives them in turn, in slices of
`--slice` seconds (the order rotating from round to round) until each had `--seconds` of load;
the idle ones wait. So the machine's drift hits all three alike, and the ratios come from one
run. After each slice the next waits until the milter's processes use no more CPU (the writer
encoded what the slice queued): that work is charged to its own side, not run beside the
next. Issue 30 asks for >= 0.8 (sample 1) and >= 0.97 (sample 0.01); the recording milter's
files are counted after its stop. Also shown: CPU time per message of each milter's process
tree (its writer process included), which other load on the machine moves less than msg/s.

    python3 benchmarks/record.py [--seconds 12] [--slice 1] [--filters rcpt headerbody]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run  # noqa: E402
from typing_extensions import override  # noqa: E402

from examples.rcpt_count import RcptCount  # noqa: E402
from pymilterkit import Status  # noqa: E402

FILTERS = {"rcpt": "examples.rcpt_count:RcptCount", "headerbody": "benchmarks.record:HeaderBody"}
SIDES: tuple[tuple[str, list[str]], ...] = (("off", []), ("sample 1", ["--record-sample", "1"]),
         ("sample 0.01", ["--record-sample", "0.01"]))


class HeaderBody(RcptCount):
    """The recipient counter that also reads every header and body chunk."""

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.size = 0 if name == "From" else getattr(self, "size", 0)
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.size += len(chunk)
        return Status.CONTINUE


def settled(pid: int, limit: float = 5.0) -> float:
    """The CPU time of `pid`'s tree once it stopped using any (its writer done with what the
    slice queued), so that work is charged to its own side and no other slice runs beside it
    (bounded: `limit` s)."""
    deadline, last = time.monotonic() + limit, run.tree_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = run.tree_cpu(pid)
        if now == last:
            return now
        last = now
    return last


def measure(target: str, seconds: float, slice_s: float, conns: int) -> dict[
        str, tuple[float, float]]:
    """(msg/s, CPU seconds per message) per side for `target`, driven in rotating slices."""
    tmp = Path(tempfile.mkdtemp(prefix="pmk-record-bench-"))
    milters: list[run.RunningMilter] = []
    original = run.milter_command
    try:
        for index, (_, extra) in enumerate(SIDES):
            record = ["--record", str(tmp / f"rec{index}"), *extra] if extra else []
            # The command of a `pymilterkit run` milter (run.py knows only its own scripts).
            def command(name: str, mode: str, spec: str, py: Path, world: bool = False,
                        r: list[str] = record) -> list[str]:
                return [str(py), "-m", "pymilterkit", "run", target, "--socket", spec,
                        "--cpu-affinity", "none", *r]

            setattr(run, "milter_command", command)  # noqa: B010 - mypy: another signature
            milters.append(run.RunningMilter(f"record{index}", "answered", Path(sys.executable),
                                             cpus={0}))
        for milter in milters:
            milter.wait_ready()
            run.loadgen(milter.spec, conns, seconds=0.5, cpus={1})
        sent, busy, cpu = [0] * len(SIDES), [0.0] * len(SIDES), [0.0] * len(SIDES)
        order = list(range(len(SIDES)))
        for _ in range(max(1, round(seconds / slice_s))):
            for i in order:
                before = run.tree_cpu(milters[i].pid)  # the writer process included
                result = run.loadgen(milters[i].spec, conns, seconds=slice_s, cpus={1})
                cpu[i] += settled(milters[i].pid) - before
                if not run.ok(result):
                    raise RuntimeError(f"{target} {SIDES[i][0]}: loadgen failed: {result}")
                sent[i] += result["messages"]
                busy[i] += float(result["seconds"])
            order = order[1:] + order[:1]
        while milters:
            milters.pop().stop()  # the writers finish their files
        files = [len(list((tmp / f"rec{i}").glob("*.milterlog"))) if (tmp / f"rec{i}").exists()
                 else 0 for i in range(len(SIDES))]
        print(f"  files written: {files[1]} (sample 1), {files[2]} (sample 0.01)")
        return {name: (sent[i] / busy[i], cpu[i] / sent[i]) for i, (name, _) in enumerate(SIDES)}
    finally:
        run.milter_command = original
        for milter in milters:
            milter.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="seconds of load per side")
    ap.add_argument("--slice", type=float, default=1.0)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--filters", nargs="+", default=list(FILTERS), choices=list(FILTERS))
    args = ap.parse_args(argv)
    run.build()
    failed = False
    for name in args.filters:
        print(f"{name} ({FILTERS[name]}):")
        rates = measure(FILTERS[name], args.seconds, args.slice, args.conns)
        off, off_cpu = rates["off"]
        for side, floor in (("sample 1", 0.8), ("sample 0.01", 0.97)):
            rate, cpu = rates[side]
            failed |= rate / off < floor
            print(f"  {side:<12} {rate:8.0f} msg/s vs off {off:8.0f}: {rate / off:.3f}x "
                  f"(floor {floor}); CPU per message {cpu * 1e6:.0f} us vs {off_cpu * 1e6:.0f} "
                  f"us: {off_cpu / cpu:.3f}x")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
