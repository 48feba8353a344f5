"""User-space instructions per message, counted by callgrind, for each benchmark milter.

Throughput on a shared 2-core VM moves by ±30% between runs; instruction counts do not. This
runs each milter of the suite under `valgrind --tool=callgrind` on a unix socket, warms it up,
zeroes the counters, sends a fixed number of messages on one connection with `build/loadgen`
(every reply verified), and dumps the counters; then it counts 10 s of waiting, whose rate
(instructions per second of a milter with nothing to do) times the run's duration is taken
off: that cost depends on how long the run took, not on the messages. The figures are the
milter process's own instructions (all its threads, kernel excluded) per message, and how they
split between the
shared objects: the interpreter (`libpython`), the ctypes crossing (`_ctypes`, `libffi`),
libmilter, and libc. Kernel time (system calls, wake-ups) is not counted: see `run.py`'s CPU
per message for that.

    apt-get install -y valgrind
    python3 benchmarks/instructions.py [--messages N] [--modes noreply answered]

Milters: `c`, `pymilter`, `pymilterkit` (one process) and `pymilterkit-empty` (the binding's
floor: the same runner and ctypes callbacks with no filter code, see `pymilterkit_empty.py`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _env  # noqa: E402
import run  # noqa: E402

MILTERS = ("c", "pymilter", "pymilterkit", "pymilterkit-empty")
WARMUP = 200
IDLE = 10.0  # seconds of waiting measured after each run (see count())
# Self cost per function, as callgrind_annotate prints it: "1,234 (0.5%)  file:fn [object]".
# Thread entry frames (clone, start_thread) are listed with their threads' whole cost: skipped.
# Inlined code from headers comes without "[object]": its source path names it instead.
_SELF = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(\S+)(?:\s+\[(.+)\])?\s*$")
_ENTRY = re.compile(r":(clone3?|start_thread)$")


def _group(where: str) -> str:
    """The part of the process an object file (or, for inlined code, a source path) is in."""
    for key, label in (("_ctypes", "ctypes + libffi"), ("libffi", "ctypes + libffi"),
                       ("/milter.", "pymilter's C module"), ("libmilter", "libmilter"),
                       ("libpython", "interpreter"), ("python3", "interpreter"),
                       ("Python-3", "interpreter"), ("libc.so", "libc")):
        if key in where:
            return label
    return "other"


def _annotate(dump: Path) -> tuple[int, dict[str, int]]:
    """A dump's total and its self costs per part of the process."""
    if not dump.exists():
        raise RuntimeError(f"no callgrind dump {dump}")
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100",
                           str(dump)], check=True, capture_output=True, text=True).stdout
    total, parts = 0, defaultdict[str, int](int)
    for line in text.splitlines():
        if line.rstrip().endswith("PROGRAM TOTALS"):
            total = int(line.split()[0].replace(",", ""))
        elif (m := _SELF.match(line)) is not None and not _ENTRY.search(m.group(2)):
            parts[_group(m.group(3) or m.group(2))] += int(m.group(1).replace(",", ""))
    if not total:
        raise RuntimeError(f"no totals in the callgrind dump {dump}")
    return total, parts


def _control(what: str, pid: int) -> None:
    subprocess.run(["callgrind_control", what, str(pid)], check=True, capture_output=True,
                   timeout=60)


def count(name: str, mode: str, messages: int, venv_py: Path) -> dict[str, Any]:
    """Instructions per message of one milter in one reply mode, and their split.

    A milter also runs instructions while it waits (pymilterkit's main thread wakes 4 times a
    second; libmilter's listener polls), a cost per second, not per message; under callgrind a
    run takes 10-60 s depending on the machine's load, so that cost moved the per-message
    figure by hundreds. It is measured after the run (IDLE seconds, no traffic) and taken off,
    in proportion to the run's duration.
    """
    out_dir = Path(tempfile.mkdtemp(prefix="pmk-cg-"))
    out = out_dir / "cg.out"
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
    milter = run.RunningMilter(name, mode, venv_py, prefix=prefix)
    try:
        milter.wait_ready(timeout=180)
        warm = run.loadgen(milter.spec, 1, messages=WARMUP)
        _control("--zero", milter.pid)
        started = time.monotonic()
        res = run.loadgen(milter.spec, 1, messages=messages)
        busy = time.monotonic() - started
        _control("--dump", milter.pid)  # cg.out.1: the run
        _control("--zero", milter.pid)
        started = time.monotonic()
        time.sleep(IDLE)
        idle = time.monotonic() - started
        _control("--dump", milter.pid)  # cg.out.2: waiting
    finally:
        milter.stop()
    if not (run.ok(warm) and run.ok(res) and res["messages"] == messages):
        raise RuntimeError(f"{name} {mode}: loadgen failed: {res}")
    total, parts = _annotate(out_dir / "cg.out.1")  # cg.out itself is written at exit
    idle_total, idle_parts = _annotate(out_dir / "cg.out.2")
    shutil.rmtree(out_dir, ignore_errors=True)
    ratio = busy / idle
    total -= round(idle_total * ratio)
    for key, value in idle_parts.items():
        parts[key] -= round(value * ratio)
    # The self costs callgrind_annotate lists add up to within a few % of the total: the
    # split is scaled to the total, so its parts are shares, not separate counts.
    scale = total / messages / max(sum(parts.values()), 1)
    return {"milter": name, "mode": mode, "messages": messages,
            "per_message": total / messages, "idle_per_second": idle_total / idle,
            "seconds": busy,
            "split": {k: v * scale for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages counted per milter")
    ap.add_argument("--modes", nargs="+", default=["noreply", "answered"],
                    choices=["noreply", "answered"])
    ap.add_argument("--milters", nargs="+", default=list(MILTERS),
                    # -metrics: benchmarks/metrics.py; -async: async def on_rcpt (issue 18.8)
                    choices=[*MILTERS, "pymilterkit-metrics", "pymilterkit-async",
                             "pymilterkit-suspend"])
    args = ap.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install -y valgrind", file=sys.stderr)
            return 2
    run.build()
    venv_py = _env.ensure_venv() if "pymilter" in args.milters else Path(sys.executable)
    print(f"user-space instructions per message, {args.messages} messages on 1 connection "
          f"after {WARMUP} of warm-up (callgrind)")
    for mode in args.modes:
        rows = [count(name, mode, args.messages, venv_py) for name in args.milters]
        c = next((r["per_message"] for r in rows if r["milter"] == "c"), None)
        print(f"\n{mode}:")
        print(f"  {'milter':20s} {'instr/msg':>10s} {'xC':>6s}  split")
        for r in rows:
            ratio = f"{r['per_message'] / c:6.2f}" if c else "     -"
            split = ", ".join(f"{k} {v / 1000:.1f}k" for k, v in r["split"].items() if v >= 50)
            print(f"  {r['milter']:20s} {r['per_message']:10,.0f} {ratio}  {split}"
                  f"  (run {r['seconds']:.0f} s; waiting: {r['idle_per_second']:,.0f}/s, "
                  f"taken off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
