"""What `--metrics` costs: the recipient counter with metrics on against off, in the same run.

The pymilterkit recipient counter (`pymilterkit_rcptcount.py`, as in `run.py`) runs without and
with `--metrics 127.0.0.1:0`, one after the other, rotated per repetition so machine drift hits
both alike; each run starts a fresh milter, warms it up, and drives it with `build/loadgen` (8
connections, 3 recipients, 1 KiB body, unix socket). While the metered milter runs, a scraper
reads `/metrics` every `--scrape-interval` seconds (Prometheus' default is 15 s; 1 s is harsher),
and after the run its counts must match what loadgen sent. Medians are reported, and the ratio
on/off, which issue 14 requires to be >= 0.9.

    python3 benchmarks/metrics.py [--reps 5] [--seconds 4] [--workers 1 2] [--modes answered]
"""

from __future__ import annotations

import argparse
import http.client
import re
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402


def _address(milter: run.RunningMilter, timeout: float = 10.0) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"metrics on http://([\d.]+):(\d+)/metrics", milter.output())
        if found:
            return found[1], int(found[2])
        time.sleep(0.05)
    raise RuntimeError(f"{milter.name}: no metrics address in its log:\n{milter.output()}")


def _scrape(address: tuple[str, int]) -> str:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"/metrics answered {response.status}")
        return body
    finally:
        conn.close()


def _sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    if not found:
        raise RuntimeError(f"no {name} in /metrics")
    return float(found[1])


class Scraper(threading.Thread):
    """Reads /metrics every `interval` seconds until stopped; counts the scrapes."""

    def __init__(self, address: tuple[str, int], interval: float) -> None:
        super().__init__(daemon=True)
        self.address, self.interval = address, interval
        self.done = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.done.wait(self.interval):
            _scrape(self.address)
            self.scrapes += 1


def measure(name: str, mode: str, conns: int, seconds: float, interval: float,
            split: bool) -> float:
    """msg/s of one fresh milter; with metrics, its counts are checked against loadgen's.

    `split`: the milter on CPU 0, loadgen on CPU 1 (run.py's `--pins split`).
    """
    milter_cpus, loadgen_cpus = ({0}, {1}) if split else (None, None)
    milter = run.RunningMilter(name, mode, Path(sys.executable), cpus=milter_cpus)
    try:
        milter.wait_ready()
        metered = name.endswith("-metrics")
        address = _address(milter) if metered else None
        warm = run.loadgen(milter.spec, conns, seconds=0.5, cpus=loadgen_cpus)
        scraper = Scraper(address, interval) if address is not None else None
        if scraper is not None:
            scraper.start()
        result = run.loadgen(milter.spec, conns, seconds=seconds, cpus=loadgen_cpus)
        if scraper is not None:
            scraper.done.set()
            scraper.join()
        if not (run.ok(warm) and run.ok(result)):
            raise RuntimeError(f"{name} {mode}: loadgen failed: {result}")
        if address is not None:
            sent = warm["messages"] + result["messages"]
            text = ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the last connections may still be closing
                text = _scrape(address)
                if _sample(text, "pymilterkit_sessions_active") == 0:
                    break
                time.sleep(0.05)
            counted = _sample(text, 'pymilterkit_stage_calls_total{stage="eom"}')
            if counted != sent:
                raise RuntimeError(f"{name}: /metrics counted {counted} messages, sent {sent}")
        return float(result["msg_per_s"])
    finally:
        milter.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["answered", "noreply"],
                    choices=["answered", "noreply"])
    ap.add_argument("--scrape-interval", type=float, default=1.0)
    ap.add_argument("--pins", choices=["split", "none"], default="split",
                    help="split (default): 1 process on CPU 0, loadgen on CPU 1 (workers=2: "
                    "unpinned, they would share a CPU); none: the scheduler decides")
    args = ap.parse_args(argv)
    run.build()
    failed = False
    for workers in args.workers:
        base = "pymilterkit" if workers == 1 else f"pymilterkit-w{workers}"
        variants = (base, f"{base}-metrics")
        for mode in args.modes:
            runs: dict[str, list[float]] = {v: [] for v in variants}
            for rep in range(args.reps):
                order = variants if rep % 2 == 0 else variants[::-1]
                for variant in order:
                    split = args.pins == "split" and workers == 1
                    runs[variant].append(measure(variant, mode, args.conns, args.seconds,
                                                 args.scrape_interval, split))
            off, on = (statistics.median(runs[v]) for v in variants)
            ratio = on / off
            failed |= ratio < 0.9
            pins = "split" if args.pins == "split" and workers == 1 else "none"
            print(f"\nworkers={workers}, {mode}, pins {pins}, {args.conns} connections, unix, "
                  f"{args.reps} runs of {args.seconds:g} s, "
                  f"scrape every {args.scrape_interval:g} s:")
            for variant in variants:
                each = ", ".join(f"{x / 1000:.1f}k" for x in runs[variant])
                print(f"  {variant:24s} {statistics.median(runs[variant]):9,.0f} msg/s   ({each})")
            print(f"  metrics on / off: {ratio:.3f}{'' if ratio >= 0.9 else '  BELOW 0.9'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
