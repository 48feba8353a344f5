"""Quick side-by-side measurement: C rcptcount vs pymilter, driven by loadgen.

Not the project's benchmark runner (that comes later); a small stdlib-only
script that reproduces the figures quoted in README.md:

    python3 benchmarks/quick_measure.py                 # defaults below
    python3 benchmarks/quick_measure.py --conns 1 8 --seconds 4 --reps 3 --pin none

It builds the C programs (make), makes sure benchmarks/build/venv has
pymilter, starts every milter variant once (each in its own process, on a
unix socket in a fresh temp dir), then for each repetition and connection
count runs loadgen against each milter in turn (interleaved, so drift hits all
alike), reading the milter's utime+stime from /proc/PID/stat before and after
each run.  Every milter is stopped with SIGTERM by its PID at the end.

Output: one JSON line per run (loadgen's line plus milter/pin/rep and
milter_cpu_us_per_msg) and a table of medians with ratios to the C milter of
the same reply mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
sys.path.insert(0, str(HERE))

import _env  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

# name -> (argv builder, C reference for the ratio)
VARIANTS = {
    "c": (lambda py, s: [str(BUILD / "rcptcount"), s], "c"),
    "c-nr": (lambda py, s: [str(BUILD / "rcptcount"), "-n", s], "c-nr"),
    "pymilter-nr": (lambda py, s: [str(py), str(HERE / "pymilter_rcptcount.py"), s], "c-nr"),
    "pymilter": (lambda py, s: [str(py), str(HERE / "pymilter_rcptcount.py"), "--reply", s], "c"),
}


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def affinity(cpus):
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"milter exited early with {proc.returncode}: {proc.args}")
        time.sleep(0.05)
    raise RuntimeError(f"socket {path} did not appear")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def loadgen(sock: Path, conns: int, seconds: float, body: int, rcpts: int,
            spin: int, cpus) -> dict:
    cmd = [str(BUILD / "loadgen"), "-s", f"unix:{sock}", "-c", str(conns),
           "-d", str(seconds), "-b", str(body), "-r", str(rcpts)]
    if spin:
        cmd += ["-S", str(spin)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=seconds + 60, preexec_fn=affinity(cpus))
    if r.stderr.strip():
        print(r.stderr.strip(), file=sys.stderr)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["exit"] = r.returncode
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--milters", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--conns", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--body", type=int, default=1024)
    ap.add_argument("--rcpts", type=int, default=3)
    ap.add_argument("--spin", type=int, default=0, help="loadgen -S (busy-poll microseconds)")
    ap.add_argument("--pin", choices=["none", "same", "split"], default="none",
                    help="none: let the scheduler place things; same: milter and loadgen "
                         "on CPU 0; split: milter on CPU 0, loadgen on CPU 1")
    ap.add_argument("--warmup", type=float, default=1.0)
    args = ap.parse_args(argv)

    subprocess.run(["make", "-s", "-C", str(HERE)], check=True)
    py = _env.ensure_venv()
    mcpus = {"none": None, "same": {0}, "split": {0}}[args.pin]
    lcpus = {"none": None, "same": {0}, "split": {1}}[args.pin]

    tmp = Path(tempfile.mkdtemp(prefix="milterbench-"))
    procs: dict[str, subprocess.Popen] = {}
    socks: dict[str, Path] = {}
    rows = []
    try:
        for name in args.milters:
            sock = tmp / f"{name}.sock"
            procs[name] = subprocess.Popen(VARIANTS[name][0](py, f"unix:{sock}"),
                                           preexec_fn=affinity(mcpus))
            socks[name] = sock
            wait_socket(sock, procs[name])
        for name in args.milters:  # warm up (imports, thread pool)
            loadgen(socks[name], 2, args.warmup, args.body, args.rcpts, args.spin, lcpus)
        for rep in range(args.reps):
            for conns in args.conns:
                for name in args.milters:
                    pid = procs[name].pid
                    c0 = proc_cpu_seconds(pid)
                    res = loadgen(socks[name], conns, args.seconds, args.body, args.rcpts,
                                  args.spin, lcpus)
                    c1 = proc_cpu_seconds(pid)
                    n = max(res["messages"], 1)
                    res.update(milter=name, rep=rep, pin=args.pin, spin=args.spin,
                               milter_cpu_s=round(c1 - c0, 3),
                               milter_cpu_us_per_msg=round((c1 - c0) / n * 1e6, 2),
                               loadgen_cpu_us_per_msg=round(res["loadgen_cpu_s"] / n * 1e6, 2))
                    print(json.dumps(res), flush=True)
                    rows.append(res)
    finally:
        for p in procs.values():
            stop(p)
        for s in socks.values():
            s.unlink(missing_ok=True)
        try:
            tmp.rmdir()
        except OSError:
            pass

    def med(name, conns, key):
        v = [r[key] for r in rows if r["milter"] == name and r["connections"] == conns]
        return statistics.median(v) if v else float("nan")

    print(f"\nmedians of {args.reps} runs, {args.seconds:g} s each, body {args.body} B, "
          f"{args.rcpts} rcpts, pin={args.pin}, spin={args.spin}")
    print(f"{'milter':<12} {'conns':>5} {'msg/s':>9} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'milter µs/msg':>13} {'loadgen µs/msg':>14}")
    for conns in args.conns:
        for name in args.milters:
            ref = VARIANTS[name][1]
            ratio = med(name, conns, "msg_per_s") / med(ref, conns, "msg_per_s") \
                if ref in args.milters else float("nan")
            print(f"{name:<12} {conns:>5} {med(name, conns, 'msg_per_s'):>9.0f} {ratio:>6.2f} "
                  f"{med(name, conns, 'p50_ms'):>8.3f} {med(name, conns, 'p99_ms'):>8.3f} "
                  f"{med(name, conns, 'milter_cpu_us_per_msg'):>13.1f} "
                  f"{med(name, conns, 'loadgen_cpu_us_per_msg'):>14.1f}")
    bad = [r for r in rows if r["failures"] or r["exit"]]
    if bad:
        print(f"{len(bad)} runs had failures", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
