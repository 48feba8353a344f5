"""`workers=2` with a perfect split of the connections: the ceiling of balancing them.

`run.py`'s `pymilterkit-w2` rows depend on how loadgen's 8 connections split between the two
workers (4/4 to 7/1; libmilter's listener in each worker accepts greedily). This measures what a
perfect 4/4 would give, without changing the runner: two single-process pymilterkit milters on
two sockets, one confined to CPU 0 and one to CPU 1 (what each pre-forked worker is), each driven
by its own loadgen with half the connections at the same time; their msg/s are added. The same
is done with two C milters, beside the usual rows (one C milter, `workers=2`), all interleaved;
medians, and ratios to the one C milter.

    python3 benchmarks/balanced.py [--reps 5] [--seconds 3] [--modes noreply answered]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

VARIANTS = ("c", "pymilterkit-w2", "c-2x4", "pymilterkit-2x4")


def _parallel(specs: list[str], conns: int, seconds: float) -> list[dict[str, Any]]:
    """One loadgen per socket, all at once."""
    results: list[dict[str, Any]] = [{} for _ in specs]

    def one(i: int) -> None:
        results[i] = run.loadgen(specs[i], conns, seconds=seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def measure(variant: str, mode: str, conns: int, seconds: float, venv_py: Path) -> float:
    """msg/s of one variant; raises if any reply was wrong."""
    if variant.endswith("-2x4"):
        name = variant.removesuffix("-2x4")
        milters = [run.RunningMilter(name, mode, venv_py, cpus={cpu}) for cpu in (0, 1)]
        per = conns // 2
    else:
        milters = [run.RunningMilter(variant, mode, venv_py)]
        per = conns
    try:
        for m in milters:
            m.wait_ready()
        specs = [m.spec for m in milters]
        _parallel(specs, per, 0.5)  # warm-up
        results = _parallel(specs, per, seconds)
    finally:
        for m in milters:
            m.stop()
    bad = [r for r in results if not run.ok(r)]
    if bad:
        raise RuntimeError(f"{variant} {mode}: loadgen failed: {bad[0]}")
    return float(sum(r["msg_per_s"] for r in results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--conns", type=int, default=8, help="in all (each half gets half)")
    ap.add_argument("--modes", nargs="+", default=["noreply", "answered"],
                    choices=["noreply", "answered"])
    args = ap.parse_args(argv)
    run.build()
    venv_py = Path(sys.executable)  # pymilter is not measured here
    for mode in args.modes:
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for variant in order:
                runs[variant].append(measure(variant, mode, args.conns, args.seconds, venv_py))
        c = statistics.median(runs["c"])
        print(f"\n{mode}, {args.conns} connections, unix socket, {args.reps} runs of "
              f"{args.seconds:g} s:")
        for variant in VARIANTS:
            med = statistics.median(runs[variant])
            each = ", ".join(f"{x / 1000:.1f}k" for x in runs[variant])
            print(f"  {variant:18s} {med:9,.0f} msg/s  {med / c:5.2f}x C   ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
