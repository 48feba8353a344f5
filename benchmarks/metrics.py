"""What `--metrics` costs: the recipient counter with metrics on against off, in the same run.

The pymilterkit recipient counter (`pymilterkit_rcptcount.py`, as in `run.py`) without and with
`--metrics 127.0.0.1:0` is measured in pairs: both milters run at once (pinned to the same CPU)
and `build/loadgen` (8 connections, 3 recipients, 1 KiB body, unix socket) drives them in
turn, in slices of `--slice` seconds (ABBAABBA..., the pair's first side alternating from pair
to pair) until each had `--seconds` of load; the idle one waits. So the machine's load, which
moves single runs by +-30% on this shared VM, hits both sides of a pair alike. While the
metered milter is driven, a scraper reads its `/metrics` every `--scrape-interval` seconds of
its load (Prometheus' default is 15 s; 1 s is harsher; several intervals may be given, each
measured on pairs of its own), and after the pair its counts must match what loadgen sent.

Each pair gives an on/off ratio of msg/s and of CPU seconds per message (the milter's user and
system time while driven); the figures are the medians over the pairs, with their range. Issue
14 requires msg/s on/off >= 0.9. Check the design with the same milter on both sides (an A/A
pair must give ~1.0): `--variants pymilterkit-metrics pymilterkit-metrics`.

    python3 benchmarks/metrics.py [--reps 7] [--seconds 4] [--slice 1] [--workers 1 2] \
        [--modes answered noreply] [--scrape-interval 1 4]
"""

from __future__ import annotations

import argparse
import http.client
import math
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

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


class Scraper:
    """Reads /metrics every `interval` seconds of the metered milter's load time: only while
    it is driven (its slices), so the scrapes never land on the other milter's slices."""

    def __init__(self, address: tuple[str, int], interval: float) -> None:
        self.address, self.interval = address, interval
        self.loaded = 0.0  # seconds of load so far
        self.scrapes = 0

    def during(self, seconds: float) -> list[threading.Timer]:
        """Start the scrapes due in the next `seconds` of load (join them after the slice)."""
        timers = []  # at 0.5 s of load, then every interval: mid-slice, not at an edge
        due = 0.5 + max(0, math.floor((self.loaded - 0.5) / self.interval) + 1) * self.interval
        while due <= self.loaded + seconds:
            timer = threading.Timer(due - self.loaded, self._scrape)
            timer.start()
            timers.append(timer)
            due += self.interval
        self.loaded += seconds
        return timers

    def _scrape(self) -> None:
        _scrape(self.address)
        self.scrapes += 1


def _counted(address: tuple[str, int]) -> float:
    """The eom calls /metrics counted, once every connection is closed."""
    text = ""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the last connections may still be closing
        text = _scrape(address)
        if _sample(text, "pymilterkit_sessions_active") == 0:
            break
        time.sleep(0.05)
    return _sample(text, 'pymilterkit_stage_calls_total{stage="eom"}')


class Pair(NamedTuple):
    """One pair's figures: msg/s and CPU seconds per message (the milter's process tree, user
    and system) without and with metrics, and the scrapes made."""

    off: float
    on: float
    cpu_off: float
    cpu_on: float
    scrapes: int


def measure_pair(names: tuple[str, str], mode: str, conns: int, seconds: float,
                 interval: float, split: bool, first: int, slice_s: float = 1.0) -> Pair:
    """msg/s of the milter without and with metrics (`names`), both running, driven in
    alternating slices of `slice_s` seconds (`seconds` in all for each; milter `first` of the
    two begins): drift of the machine's load hits both alike. The metered milter's counts are
    checked against loadgen's.

    `split`: the milters on CPU 0, loadgen on CPU 1 (run.py's `--pins split`).
    """
    milter_cpus, loadgen_cpus = ({0}, {1}) if split else (None, None)
    milters = [run.RunningMilter(name, mode, Path(sys.executable), cpus=milter_cpus)
               for name in names]
    try:
        for milter in milters:
            milter.wait_ready()
        address = _address(milters[1])
        scraper = Scraper(address, interval)
        sent = [0, 0]  # every message, warm-up included (what /metrics must count)
        measured, busy, cpu = [0, 0], [0.0, 0.0], [0.0, 0.0]
        for i, milter in enumerate(milters):
            warm = run.loadgen(milter.spec, conns, seconds=0.5, cpus=loadgen_cpus)
            if not run.ok(warm):
                raise RuntimeError(f"{names[i]} {mode}: loadgen failed: {warm}")
            sent[i] += warm["messages"]
        order = (first, 1 - first)
        for _ in range(max(1, round(seconds / slice_s))):
            for i in order:
                timers = scraper.during(slice_s) if i == 1 else []
                before = run.tree_cpu(milters[i].pid)
                result = run.loadgen(milters[i].spec, conns, seconds=slice_s, cpus=loadgen_cpus)
                for timer in timers:
                    timer.join()
                cpu[i] += run.tree_cpu(milters[i].pid) - before
                if not run.ok(result):
                    raise RuntimeError(f"{names[i]} {mode}: loadgen failed: {result}")
                sent[i] += result["messages"]
                measured[i] += result["messages"]
                busy[i] += float(result["seconds"])
            order = order[::-1]  # ABBAABBA...: neither side always goes first
        counted = _counted(address)
        if counted != sent[1]:
            raise RuntimeError(f"{names[1]}: /metrics counted {counted} messages, sent {sent[1]}")
        return Pair(measured[0] / busy[0], measured[1] / busy[1],
                    cpu[0] / measured[0], cpu[1] / measured[1], scraper.scrapes)
    finally:
        for milter in milters:
            milter.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="on/off pairs per case")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["answered", "noreply"],
                    choices=["answered", "noreply"])
    ap.add_argument("--scrape-interval", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--slice", type=float, default=1.0,
                    help="seconds each milter is driven before the other one is")
    ap.add_argument("--variants", nargs=2, metavar=("OFF", "ON"),
                    help="the pair's milters (the second is scraped; default: pymilterkit and "
                    "pymilterkit-metrics, -wN with --workers N)")
    ap.add_argument("--pins", choices=["split", "none"], default="split",
                    help="split (default): 1 process on CPU 0, loadgen on CPU 1 (workers=2: "
                    "unpinned, they would share a CPU); none: the scheduler decides")
    args = ap.parse_args(argv)
    run.build()
    failed = False
    for workers in args.workers:
        base = "pymilterkit" if workers == 1 else f"pymilterkit-w{workers}"
        variants = tuple(args.variants or (base, f"{base}-metrics"))
        split = args.pins == "split" and workers == 1
        for mode in args.modes:
            for interval in args.scrape_interval:
                runs: list[list[float]] = [[], []]  # msg/s, by side (off, on)
                ratios: list[float] = []
                scrapes = 0
                cpu: list[list[float]] = [[], []]  # CPU seconds per message, by side
                cpu_ratios: list[float] = []
                for rep in range(args.reps):
                    pair = measure_pair(variants, mode, args.conns, args.seconds, interval,
                                        split, first=rep % 2, slice_s=args.slice)
                    runs[0].append(pair.off)
                    runs[1].append(pair.on)
                    cpu[0].append(pair.cpu_off)
                    cpu[1].append(pair.cpu_on)
                    ratios.append(pair.on / pair.off)
                    cpu_ratios.append(pair.cpu_on / pair.cpu_off)
                    scrapes += pair.scrapes
                ratio = statistics.median(ratios)
                failed |= ratio < 0.9
                print(f"\nworkers={workers}, {mode}, pins {'split' if split else 'none'}, "
                      f"{args.conns} connections, unix, {args.reps} pairs of {args.seconds:g} s "
                      f"each in {args.slice:g} s slices, scrape every {interval:g} s of load "
                      f"({scrapes} scrapes):")
                for side, variant in enumerate(variants):
                    each = ", ".join(f"{x / 1000:.1f}k" for x in runs[side])
                    print(f"  {variant:24s} {statistics.median(runs[side]):9,.0f} msg/s, "
                          f"{statistics.median(cpu[side]) * 1e6:6.1f} us CPU/msg "
                          f"(medians; msg/s {each})")
                each = ", ".join(f"{r:.3f}" for r in ratios)
                print(f"  metrics on / off: {ratio:.3f} msg/s, median of the pairs "
                      f"(range {min(ratios):.3f}-{max(ratios):.3f}: {each})"
                      f"{'' if ratio >= 0.9 else '  BELOW 0.9'}")
                each = ", ".join(f"{r:.3f}" for r in cpu_ratios)
                print(f"  CPU per message on / off: {statistics.median(cpu_ratios):.3f}, median "
                      f"(range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}: {each})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
