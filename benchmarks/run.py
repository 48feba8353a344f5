"""pymilterkit benchmark suite: one command, every milter, one table.

    python3 benchmarks/run.py                    # full run (about 17 minutes on 2 cores)
    python3 benchmarks/run.py --quick            # smoke run, seconds; no figures worth quoting
    python3 benchmarks/run.py --seconds 4 --reps 5 --pins none split
    python3 benchmarks/run.py --postfix          # also: throughput through a throwaway Postfix
                                                 # (root), unix vs TCP, pymilterkit vs pymilter

What it does, in one invocation:

1. builds the C parts (``make -C benchmarks``: ``build/rcptcount``, ``build/loadgen``) and makes
   sure the benchmark venv (``build/venv``, pymilter from PyPI, matplotlib) exists;
2. runs the recipient-counting workload (3 recipients, 5 headers, body of 1 KiB or 64 KiB) with
   ``loadgen`` (C, verifies every reply: a missing/wrong ``X-Rcpt-Count`` is a failure) on
   1 and 8 connections, in both reply modes (``answered``: MAIL and RCPT answered;
   ``noreply``: SMFIP_NR_MAIL|NR_RCPT), against four milters on a unix socket:
   ``c`` (libmilter, the limit), ``pymilter`` (1.0.5 from PyPI), ``pymilterkit`` (1 process,
   default ``cpu_affinity="auto"``: on one CPU) and ``pymilterkit-w2`` (``workers=2``), plus two
   placement variants: ``pymilter-1cpu`` (pymilter confined to one CPU, as ``taskset`` would)
   and ``pymilterkit-anycpu`` (``--cpu-affinity none``), and the binding's floor,
   ``pymilterkit-empty-w2`` (``pymilterkit_empty.py``: the same two workers whose callbacks run
   no filter code). Every measurement starts its milter
   fresh (by PID, socket in a temp dir), warms it up, reads its CPU time (utime+stime of the
   process and of its pre-forked children, ``/proc/PID/stat``) before and after the timed run,
   and stops it by PID. The order of
   the milters is rotated between repetitions; medians over the repetitions are reported;
3. prints a table per (pinning, reply mode, connections, body) with msg/s, p50/p99 latency and
   milter CPU per message, each also as a ratio to pymilter and to C, plus, for pre-forked
   milters, how each run's connections were split between the workers (sampled mid-run), the
   generator's own CPU share (headroom) and the memory figures;
4. saves everything to ``benchmarks/results/latest.json`` and plots ``docs/performance.png``.

Before the throughput runs it also times pymilterkit's callbacks called from C in one thread
(``callbacks.py``: no socket, warm caches, a stub ``smfi_addheader``), against an empty ctypes
callback of the same type.

Pinning (``--pins``): ``none`` lets the scheduler place milter and loadgen on the 2 CPUs (what a
deployment sees; the targets are judged on it); ``split`` pins the milter to CPU 0 and loadgen to
CPU 1 (stable single-connection figures; workers=2 is left out, it would share one CPU).

Memory (``--memory``, on by default): a fresh milter per kind; RSS after a warm-up, after 1,000
and after 100,000 short connections (``loadgen -m 1``: connect, negotiate, one message, quit),
and per idle connection (500 negotiated connections held open).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import _env  # noqa: E402
import callbacks  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MILTERS = ("c", "pymilter", "pymilter-1cpu", "pymilterkit", "pymilterkit-anycpu",
           "pymilterkit-w2", "pymilterkit-empty-w2")
# Opt-in (`--milters`): pymilterkit with `async def on_rcpt` (pymilterkit_rcptcount.py --async),
# against `pymilterkit`: what the event-loop hand-off costs per RCPT. `-async` never suspends,
# `-suspend` awaits once (asyncio.sleep(0)), `-lookup` awaits a UDP echo (benchmarks/echo.py):
# what a real await costs. The last two exist in answered mode only.
OPTIONAL = ("pymilterkit-async", "pymilterkit-async-w2", "pymilterkit-suspend",
            "pymilterkit-suspend-w2", "pymilterkit-lookup", "pymilterkit-lookup-w2")
ASYNC_KINDS = {"async": ["--async", "never"], "suspend": ["--async", "suspend"],
               "lookup": ["--async", "lookup"]}
ANSWERED_ONLY = ("suspend", "lookup")
# Fairness rows, in pin=none only: pymilter confined to one CPU with taskset (what pymilterkit
# does by default, cpu_affinity="auto"), and pymilterkit with --cpu-affinity none.
VARIANTS = ("pymilter-1cpu", "pymilterkit-anycpu")
# The binding's floor (pymilterkit_empty.py): workers=2 whose callbacks run no filter code.
MODES = ("answered", "noreply")
RCPTS = 3


# -- milters -----------------------------------------------------------------------------------


def milter_command(name: str, mode: str, spec: str, venv_py: Path,
                   world_socket: bool = False) -> list[str]:
    """The command line of one benchmark milter in one reply mode (`world_socket`: a unix
    socket anyone may connect to, for Postfix's smtpd)."""
    noreply = mode == "noreply"
    if name == "c":  # -t on TCP: the runner's recipe (TCP_NODELAY listener as fd:N, DATA answered)
        tcp = ["-t"] if spec.startswith("inet:") else []
        return [str(BUILD / "rcptcount"), *(["-n"] if noreply else []), *tcp, spec]
    if name in ("pymilter", "pymilter-1cpu"):  # -1cpu: confined by RunningMilter
        return [str(venv_py), str(HERE / "pymilter_rcptcount.py"),
                *([] if noreply else ["--reply"]), spec]
    if name.startswith("pymilterkit"):
        # -metrics (benchmarks/metrics.py): the same milter with --metrics on a free port
        metrics = ["--metrics", "127.0.0.1:0"] if name.endswith("-metrics") else []
        name = name.removesuffix("-metrics")
        workers = ["--workers", name.rsplit("-w", 1)[1]] if "-w" in name else []
        mode_arg = ["--socket-mode", "666"] if world_socket and spec.startswith("unix:") else []
        anycpu = ["--cpu-affinity", "none"] if name.endswith("-anycpu") else []
        kind = async_kind(name)
        anycpu += ASYNC_KINDS.get(kind, [])
        anycpu += ["--lookup", str(echo_port())] if kind == "lookup" else []
        script = "pymilterkit_empty.py" if "-empty" in name else "pymilterkit_rcptcount.py"
        return [sys.executable, str(HERE / script),
                *(["--noreply"] if noreply else []), *workers, *mode_arg, *anycpu, *metrics, spec]
    raise ValueError(name)


def async_kind(name: str) -> str:
    """"async", "suspend", "lookup" for the async rows (any -wN, -metrics stripped), else ""."""
    base = name.removesuffix("-metrics")
    base = base.rsplit("-w", 1)[0] if "-w" in base else base
    kind = base.rsplit("-", 1)[-1]
    return kind if kind in ASYNC_KINDS else ""


_echo: list[subprocess.Popen[str]] = []
_echo_port: list[int] = []


def echo_port() -> int:
    """The port of this run's UDP echo server (benchmarks/echo.py), started on first use."""
    if not _echo_port:
        proc = subprocess.Popen([sys.executable, str(HERE / "echo.py")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        _echo.append(proc)
        assert proc.stdout is not None
        _echo_port.append(int(proc.stdout.readline()))
    return _echo_port[0]


def stop_echo() -> None:
    """Stop the echo server this run started (by PID), if any."""
    for proc in _echo:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _echo.clear()
    _echo_port.clear()


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads), from /proc/PID/task/*/children."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def idle_sockets(pid: int) -> dict[int, set[str]]:
    """The sockets each pre-forked worker of `pid` holds with no MTA connected (its listening
    socket, the drain gate's spare, its line to the parent), to leave out of the count."""
    return {child: _sockets(child) for child in children(pid)}


def connections_per_worker(pid: int, idle: dict[int, set[str]]) -> list[int]:
    """The MTA connections each pre-forked worker of `pid` holds, largest first: its sockets
    other than those it held idle (`idle_sockets`) and those its parent has too. Empty for one
    process."""
    shared = _sockets(pid)
    return sorted(
        (len(_sockets(child) - shared - idle.get(child, set())) for child in children(pid)),
        reverse=True,
    )


def _sockets(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:"):
                    found.add(target)
    return found


def tree_cpu(pid: int) -> float:
    """utime+stime in seconds of `pid` and its live descendants (pre-forked workers)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            f = _stat_fields(p)
            total += int(f[11]) + int(f[12])  # fields 14 and 15: utime, stime
    return total / CLK_TCK


def tree_rss(pid: int) -> int:
    """Resident set size in bytes of `pid` and its descendants."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/statm") as f:
            total += int(f.read().split()[1]) * PAGE
    return total


def _affinity(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _connectable(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class RunningMilter:
    """One benchmark milter in its own process on a unix socket in a fresh temp dir."""

    def __init__(self, name: str, mode: str, venv_py: Path, cpus: set[int] | None = None,
                 spec: str | None = None, umask: int | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.name, self.mode = name, mode
        self.tmp = Path(tempfile.mkdtemp(prefix="pmk-bench-"))
        self.spec = spec or f"unix:{self.tmp / 'm.sock'}"
        self.sock = Path(self.spec[5:]) if self.spec.startswith("unix:") else self.tmp / "none"
        self.log = open(self.tmp / "milter.log", "wb")  # noqa: SIM115 - closed in stop()
        if name.endswith("-1cpu") and cpus is None:  # as pymilterkit's cpu_affinity="auto"
            cpus = {max(os.sched_getaffinity(0))}

        def pre() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if umask is not None:
                os.umask(umask)

        self.proc = subprocess.Popen(  # `prefix`: a wrapper such as valgrind (instructions.py)
            [*prefix, *milter_command(name, mode, self.spec, venv_py, umask is not None)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=pre, cwd=ROOT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if self.spec.startswith("unix:"):
                if self.sock.exists() and _connectable(self.sock):
                    return
            elif _tcp_listening(self.spec):
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not listen on {self.spec}")

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / "milter.log").read_text("utf-8", "replace")[-4000:]

    def stop(self) -> int:
        """SIGTERM by PID; poke the socket so libmilter's 5 s listener poll ends at once."""
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self.spec.startswith("unix:") and self.sock.exists():
                    _connectable(self.sock)
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
            code = self.proc.wait(10)
        self.log.close()
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.tmp.rmdir()
        return code


def _tcp_listening(spec: str) -> bool:
    port, _, host = spec.split(":", 1)[1].partition("@")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect((host or "127.0.0.1", int(port)))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def started(name: str, mode: str, venv_py: Path, cpus: set[int] | None = None,
            **kw: Any) -> Iterator[RunningMilter]:
    m = RunningMilter(name, mode, venv_py, cpus, **kw)
    try:
        m.wait_ready()
        yield m
    finally:
        m.stop()


def loadgen(spec: str, conns: int, *, seconds: float | None = None, messages: int | None = None,
            body: int = 1024, per_conn: int = 0, cpus: set[int] | None = None) -> dict[str, Any]:
    """Run build/loadgen once; its JSON line plus exit status and stderr."""
    cmd = [str(BUILD / "loadgen"), "-s", spec, "-c", str(conns), "-b", str(body),
           "-r", str(RCPTS), "-t", "30"]
    if seconds is not None:
        cmd += ["-d", f"{seconds:g}"]
    if messages is not None:
        cmd += ["-n", str(messages)]
    if per_conn:
        cmd += ["-m", str(per_conn)]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_affinity(cpus),
                       timeout=(seconds or 0) + 600)
    lines = r.stdout.strip().splitlines()
    res: dict[str, Any] = json.loads(lines[-1]) if lines else {
        "messages": 0, "failures": 1, "msg_per_s": 0.0, "seconds": 0.0}
    res["exit"] = r.returncode
    if r.stderr.strip():
        res["stderr"] = r.stderr.strip()[-2000:]
    return res


# -- throughput runs ---------------------------------------------------------------------------


PINS: dict[str, tuple[set[int] | None, set[int] | None]] = {
    "none": (None, None),
    "split": ({0}, {1}),
}


def measure(name: str, mode: str, pin: str, conns: int, body: int, seconds: float,
            warmup: float, venv_py: Path) -> dict[str, Any]:
    mcpus, lcpus = PINS[pin]
    with started(name, mode, venv_py, mcpus) as m:
        warm = loadgen(m.spec, conns, seconds=warmup, body=body, cpus=lcpus)
        # Pre-forked workers: how the connections were split between them, mid-run.
        split: list[list[int]] = []
        idle = idle_sockets(m.pid)
        sampler = threading.Timer(seconds / 2, lambda: split.append(
            connections_per_worker(m.pid, idle)))
        c0 = tree_cpu(m.pid)
        sampler.start()
        res = loadgen(m.spec, conns, seconds=seconds, body=body, cpus=lcpus)
        c1 = tree_cpu(m.pid)
        sampler.cancel()
        rss = tree_rss(m.pid)
        nproc = len(tree(m.pid))
    n = max(res.get("messages", 0), 1)
    res.update(
        milter=name, mode=mode, pin=pin, conns=conns, body=body,
        milter_cpu_s=round(c1 - c0, 3),
        milter_cpu_us_per_msg=round((c1 - c0) / n * 1e6, 2),
        loadgen_cpu_us_per_msg=round(res.get("loadgen_cpu_s", 0.0) / n * 1e6, 2),
        milter_rss_kib=rss // 1024, milter_processes=nproc,
        worker_connections=split[0] if split else [],
        warmup_failures=warm.get("failures", 0) + (warm["exit"] != 0),
    )
    return res


def run_throughput(args: argparse.Namespace, venv_py: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    combos = [(pin, conns, body, mode) for pin in args.pins for conns in args.conns
              for body in args.bodies for mode in args.modes]
    total = args.reps * sum(len(milters_for(args, pin)) for pin, *_ in combos)
    done = 0
    t0 = time.monotonic()
    for rep in range(args.reps):
        for pin, conns, body, mode in combos:
            names = [n for n in milters_for(args, pin)
                     if mode == "answered" or async_kind(n) not in ANSWERED_ONLY]
            k = rep % len(names)
            for name in names[k:] + names[:k]:  # rotate: drift hits every milter alike
                res = measure(name, mode, pin, conns, body, args.seconds, args.warmup, venv_py)
                res["rep"] = rep
                rows.append(res)
                done += 1
                bad = "" if ok(res) else f"  FAILED: {res.get('stderr', '')[:300]}"
                if res["worker_connections"]:
                    bad = f"  split {'/'.join(map(str, res['worker_connections']))}{bad}"
                print(f"[{done:3d}/{total} {time.monotonic() - t0:6.0f}s] pin={pin:<5} "
                      f"{mode:<8} c={conns} b={body:<5} {name:<18} "
                      f"{res.get('msg_per_s', 0):9.0f} msg/s  p50 {res.get('p50_ms', 0):.3f} ms"
                      f"  cpu {res['milter_cpu_us_per_msg']:7.1f} us/msg{bad}", flush=True)
    return rows


def milters_for(args: argparse.Namespace, pin: str) -> list[str]:
    if pin == "split":  # workers=2 on one pinned CPU measures nothing useful; the variants
        return [m for m in args.milters if "-w" not in m and m not in VARIANTS]  # are placements
    return list(args.milters)


def ok(res: dict[str, Any]) -> bool:
    return (res.get("failures", 1) == 0 and res.get("exit", 1) == 0
            and res.get("conn_errors", 0) == 0 and res.get("messages", 0) > 0)


FIGURES = ("msg_per_s", "p50_ms", "p99_ms", "milter_cpu_us_per_msg")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (pin, mode, conns, body, milter), with ratios to pymilter and to C."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["pin"], r["mode"], r["conns"], r["body"], r["milter"]), []).append(r)
    out = []
    for key, rs in groups.items():
        s: dict[str, Any] = dict(zip(("pin", "mode", "conns", "body", "milter"), key, strict=True))
        for f in (*FIGURES, "loadgen_cpu_us_per_msg", "milter_rss_kib"):
            s[f] = round(statistics.median(r.get(f, 0.0) for r in rs), 4)
        s["runs"] = len(rs)
        s["failed_runs"] = sum(not ok(r) for r in rs)
        s["messages"] = sum(r.get("messages", 0) for r in rs)
        s["failures"] = sum(r.get("failures", 0) for r in rs)
        s["loadgen_cores"] = round(statistics.median(
            r.get("loadgen_cpu_s", 0) / max(r.get("seconds", 1), 1e-9) for r in rs), 3)
        s["milter_cores"] = round(statistics.median(
            r["milter_cpu_s"] / max(r.get("seconds", 1), 1e-9) for r in rs), 3)
        out.append(s)
    index = {(s["pin"], s["mode"], s["conns"], s["body"], s["milter"]): s for s in out}
    for s in out:
        for ref in ("pymilter", "c"):
            other = index.get((s["pin"], s["mode"], s["conns"], s["body"], ref))
            for f in FIGURES:
                v = other[f] if other else 0
                s[f"{f}_x_{ref}"] = round(s[f] / v, 3) if v else None
    order = {m: i for i, m in enumerate(MILTERS + OPTIONAL)}
    out.sort(key=lambda s: (list(PINS).index(s["pin"]), MODES.index(s["mode"]), s["conns"],
                            s["body"], order.get(s["milter"], 99)))
    return out


def _x(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def print_table(summary: list[dict[str, Any]], seconds: float, reps: int) -> None:
    print(f"\nMedians of {reps} run(s) of {seconds:g} s; {RCPTS} recipients; unix socket; "
          f"ratios: xpym = / pymilter, xC = / C milter (same mode, pin, conns, body).")
    print("For msg/s higher is better; for latency and CPU lower is better.")
    head = (f"{'pin':<5} {'mode':<8} {'conns':>5} {'body':>6} {'milter':<18} "
            f"{'msg/s':>8} {'xpym':>6} {'xC':>6} | {'p50 ms':>7} {'xpym':>6} {'xC':>6} | "
            f"{'p99 ms':>7} {'xpym':>6} {'xC':>6} | {'cpu µs/msg':>10} {'xpym':>6} {'xC':>6}"
            f" | fail")
    print(head)
    print("-" * len(head))
    last = None
    for s in summary:
        key = (s["pin"], s["mode"], s["conns"], s["body"])
        if last is not None and key != last:
            print()
        last = key
        body = f"{s['body'] // 1024}K"
        print(f"{s['pin']:<5} {s['mode']:<8} {s['conns']:>5} {body:>6} {s['milter']:<18} "
              f"{s['msg_per_s']:>8.0f} {_x(s['msg_per_s_x_pymilter'])} {_x(s['msg_per_s_x_c'])} | "
              f"{s['p50_ms']:>7.3f} {_x(s['p50_ms_x_pymilter'])} {_x(s['p50_ms_x_c'])} | "
              f"{s['p99_ms']:>7.3f} {_x(s['p99_ms_x_pymilter'])} {_x(s['p99_ms_x_c'])} | "
              f"{s['milter_cpu_us_per_msg']:>10.1f} {_x(s['milter_cpu_us_per_msg_x_pymilter'])} "
              f"{_x(s['milter_cpu_us_per_msg_x_c'])} | {s['failures']}")


def print_async(summary: list[dict[str, Any]]) -> None:
    """Each async row against its sync twin (`pymilterkit`, and `pymilterkit-w2` for a -w2
    row) in the same pin/mode/conns/body; and the CPU one suspension costs: (CPU/msg of
    -suspend minus that of -async, the never-suspending twin) / the RCPTs of a message."""
    index = {(s["pin"], s["mode"], s["conns"], s["body"], s["milter"]): s for s in summary}
    rows = [s for s in summary if async_kind(s["milter"])]
    if not rows:
        return
    print("\nasync def on_rcpt against the sync twin (same run; x1 = the sync pymilterkit, "
          "1 process; xtwin = the sync row with the same workers):")
    print(f"{'pin':<5} {'mode':<8} {'conns':>5} {'body':>6} {'milter':<24} {'msg/s':>8} "
          f"{'x1':>6} {'xtwin':>6} {'cpu/msg':>8} {'xtwin':>6} {'us/susp':>8}")
    for a in rows:
        key = (a["pin"], a["mode"], a["conns"], a["body"])
        one = index.get((*key, "pymilterkit"))
        workers = a["milter"].rsplit("-w", 1)[1] if "-w" in a["milter"] else ""
        twin = index.get((*key, "pymilterkit" + (f"-w{workers}" if workers else "")))
        never = index.get((*key, a["milter"].replace("-suspend", "-async")))
        if twin is not None:
            a["x_sync"] = {f: round(a[f] / twin[f], 3) if twin[f] else None for f in FIGURES}
        if one is not None and one["msg_per_s"]:
            a["x_sync_1"] = round(a["msg_per_s"] / one["msg_per_s"], 3)
        per_suspension = None
        if async_kind(a["milter"]) == "suspend" and never is not None:
            per_suspension = round((a["milter_cpu_us_per_msg"]
                                    - never["milter_cpu_us_per_msg"]) / RCPTS, 1)
            a["cpu_us_per_suspension"] = per_suspension
        x = a.get("x_sync") or {}
        print(f"{a['pin']:<5} {a['mode']:<8} {a['conns']:>5} {a['body'] // 1024:>5}K "
              f"{a['milter']:<24} {a['msg_per_s']:>8.0f} {_x(a.get('x_sync_1'))} "
              f"{_x(x.get('msg_per_s'))} {a['milter_cpu_us_per_msg']:>8.1f} "
              f"{_x(x.get('milter_cpu_us_per_msg'))} "
              f"{'' if per_suspension is None else f'{per_suspension:8.1f}'}")


def print_splits(rows: list[dict[str, Any]]) -> None:
    """Each pre-forked run's split of the connections between workers, with its msg/s: a
    worker holds the connections its libmilter accepted, for as long as they stay open."""
    multi = [r for r in rows if r.get("worker_connections")]
    if not multi:
        return
    print("\nPre-forked workers: connections held by each worker mid-run (msg/s), every run")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in multi:
        groups.setdefault((r["pin"], r["mode"], r["conns"], r["body"], r["milter"]), []).append(r)
    for (pin, mode, conns, body, name), rs in groups.items():
        runs = "  ".join(f"{'/'.join(map(str, r['worker_connections']))} "
                         f"({r.get('msg_per_s', 0) / 1000:.1f}k)" for r in rs)
        print(f"{pin:<5} {mode:<8} {conns:>3} {body // 1024:>4}K {name:<21} {runs}")


def headroom(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How much CPU the generator itself used while driving the C milter."""
    out = []
    for s in summary:
        if s["milter"] != "c":
            continue
        out.append({k: s[k] for k in ("pin", "mode", "conns", "body", "msg_per_s",
                                      "loadgen_cpu_us_per_msg", "milter_cpu_us_per_msg",
                                      "loadgen_cores", "milter_cores")})
    return out


def print_headroom(rows: list[dict[str, Any]]) -> None:
    print("\nGenerator headroom (driving the C milter): loadgen's CPU per message and the cores it "
          "kept busy;\n'gen limit' = 1e6 / loadgen µs per msg, the rate loadgen alone could "
          "sustain on one core per connection thread.")
    print(f"{'pin':<5} {'mode':<8} {'conns':>5} {'body':>6} {'C msg/s':>8} "
          f"{'gen µs/msg':>10} {'gen cores':>9} {'C µs/msg':>9} {'gen limit':>10}")
    for h in rows:
        limit = 1e6 / h["loadgen_cpu_us_per_msg"] * min(h["conns"], os.cpu_count() or 1) \
            if h["loadgen_cpu_us_per_msg"] else 0
        h["generator_limit_msg_per_s"] = round(limit)
        print(f"{h['pin']:<5} {h['mode']:<8} {h['conns']:>5} {h['body'] // 1024:>5}K "
              f"{h['msg_per_s']:>8.0f} {h['loadgen_cpu_us_per_msg']:>10.1f} "
              f"{h['loadgen_cores']:>9.2f} {h['milter_cpu_us_per_msg']:>9.1f} {limit:>10.0f}")


# -- memory ------------------------------------------------------------------------------------


def _negotiate(sock: socket.socket) -> None:
    sock.sendall(struct.pack(">IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF))
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("milter closed the connection during negotiation")
        head += chunk
    (length,) = struct.unpack(">I", head)
    got = 0
    while got < length:
        chunk = sock.recv(length - got)
        if not chunk:
            raise ConnectionError("short negotiation reply")
        got += len(chunk)


def run_memory(name: str, venv_py: Path, short: Sequence[int], idle: int) -> dict[str, Any]:
    """RSS of a fresh milter: warm, with `idle` negotiated connections open (then closed), and
    after each batch of short connections."""
    out: dict[str, Any] = {"milter": name, "mode": "answered"}
    with started(name, "answered", venv_py) as m:
        warm = loadgen(m.spec, 8, messages=200, per_conn=1)
        time.sleep(0.3)
        out["rss_warm_kib"] = tree_rss(m.pid) // 1024
        before = tree_rss(m.pid)
        held: list[socket.socket] = []
        try:
            for _ in range(idle):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(str(m.sock))
                held.append(s)
                _negotiate(s)
            time.sleep(0.5)
            during = tree_rss(m.pid)
        finally:
            for s in held:
                s.close()
        out["idle_connections"] = idle
        out["rss_before_idle_kib"] = before // 1024
        out["rss_with_idle_kib"] = during // 1024
        out["rss_per_idle_connection_bytes"] = round((during - before) / max(idle, 1))
        done, failures = 0, warm["failures"] + (warm["exit"] != 0)
        for target in short:
            res = loadgen(m.spec, 8, messages=target - done, per_conn=1)
            failures += res["failures"] + (res["exit"] != 0) + res.get("conn_errors", 0)
            done = target
            time.sleep(0.3)
            out[f"rss_after_{target}_kib"] = tree_rss(m.pid) // 1024
            out[f"seconds_{target}"] = res.get("seconds")
        out["short_connection_failures"] = failures
    first, last = short[0], short[-1]
    out["growth_kib"] = out[f"rss_after_{last}_kib"] - out[f"rss_after_{first}_kib"]
    return out


def print_memory(mem: list[dict[str, Any]], short: Sequence[int]) -> None:
    print("\nMemory (RSS of the milter process; answered variant, unix socket):")
    cols = " ".join(f"{'after ' + format(n, ','):>14}" for n in short)
    print(f"{'milter':<18} {'warm':>9} {cols} {'growth':>9} {'per idle conn':>14} fail")
    for r in mem:
        vals = " ".join(f"{r[f'rss_after_{n}_kib'] / 1024:>11.1f} MB" for n in short)
        print(f"{r['milter']:<18} {r['rss_warm_kib'] / 1024:>6.1f} MB {vals} "
              f"{r['growth_kib'] / 1024:>6.2f} MB {r['rss_per_idle_connection_bytes'] / 1024:>9.1f}"
              f" KiB {r['short_connection_failures']}")


# -- Postfix -----------------------------------------------------------------------------------


def run_postfix(args: argparse.Namespace, venv_py: Path) -> list[dict[str, Any]]:
    """msg/s through a private Postfix: pymilterkit, pymilter and C, each on unix and TCP."""
    sys.path.insert(0, str(ROOT))
    from tests.e2e.postfix import PostfixInstance, free_port, make_socket_dir

    rows = []
    combos = [(name, mode) for name in ("pymilterkit", "pymilter", "c") for mode in args.modes]
    for rep in range(args.postfix_reps):
        for name, mode in combos:
            for transport in ("unix", "inet"):
                scratch = Path(tempfile.mkdtemp(prefix="pmk-pfb-"))
                sockdir = make_socket_dir(scratch)
                if transport == "unix":
                    path = sockdir / "m.sock"
                    spec, pf_spec = f"unix:{path}", f"unix:{path}"
                else:
                    port = free_port()
                    spec, pf_spec = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
                with started(name, mode, venv_py, spec=spec, umask=0) as m, \
                        PostfixInstance(pf_spec, {"defer_transports": "sink"}) as pf:
                    pf.start()
                    res = _smtp_load(pf.smtp_port, args.postfix_conns, args.postfix_seconds)
                    res.update(milter=name, mode=mode, transport=transport, rep=rep,
                               verified=_verify_queue(pf))
                    _ = m
                rows.append(res)
                shutil.rmtree(sockdir, ignore_errors=True)
                shutil.rmtree(scratch, ignore_errors=True)
                print(f"postfix rep {rep} {name:<12} {mode:<8} {transport:<5} "
                      f"{res['msg_per_s']:7.1f} msg/s "
                      f"p50 {res['p50_ms']:.1f} ms  failures {res['failures']} "
                      f"verified {res['verified']}", flush=True)
    return rows


_MESSAGE = (b"From: a@example.net\r\nTo: b@example.com\r\nSubject: bench\r\n"
            b"Message-Id: <bench@example.net>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
            + b"x" * 70 + b"\r\n") * 1


def _smtp_load(port: int, conns: int, seconds: float) -> dict[str, Any]:
    import smtplib
    import threading

    lat: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + 1.0 + seconds
    start_at = time.monotonic() + 1.0
    rcpts = ["r1@example.com", "r2@example.com", "r3@example.org"]

    def worker() -> None:
        mine: list[float] = []
        fails = 0
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.ehlo("bench.example.net")
                while time.monotonic() < start_at:
                    time.sleep(0.005)
                while time.monotonic() < stop_at:
                    t = time.monotonic()
                    try:
                        refused = smtp.sendmail("s@example.net", rcpts, _MESSAGE)
                        if refused:
                            fails += 1
                        else:
                            mine.append(time.monotonic() - t)
                    except smtplib.SMTPException:
                        fails += 1
                        smtp.rset()
        except OSError:
            fails += 1
        with lock:
            lat.extend(mine)
            failures[0] += fails

    threads = [threading.Thread(target=worker) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    lat.sort()
    n = len(lat)
    return {"messages": n, "failures": failures[0], "seconds": seconds,
            "msg_per_s": round(n / seconds, 1), "conns": conns,
            "p50_ms": round(lat[n // 2] * 1e3, 2) if n else 0.0,
            "p99_ms": round(lat[min(n - 1, int(n * 0.99))] * 1e3, 2) if n else 0.0}


def _verify_queue(pf: Any) -> str:
    """Check X-Rcpt-Count: 3 in a few queued (deferred) messages; 'k/n ok'."""
    ids = [str(e["queue_id"]) for e in pf.queue_json()]
    sample = random.sample(ids, min(5, len(ids)))
    good = sum("X-Rcpt-Count: 3" in pf.postcat(q) for q in sample)
    return f"{good}/{len(sample)}"


def print_postfix(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["milter"], r["mode"], r["transport"]), []).append(r)
    summary = []
    for (name, mode, transport), rs in groups.items():
        summary.append({"milter": name, "mode": mode, "transport": transport,
                        "msg_per_s": statistics.median(r["msg_per_s"] for r in rs),
                        "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                        "failures": sum(r["failures"] for r in rs),
                        "verified": ", ".join(r["verified"] for r in rs)})
    print("\nThrough a private Postfix (8 smtplib clients -> smtpd -> milter; medians):")
    print(f"{'milter':<12} {'mode':<8} {'socket':<6} {'msg/s':>8} {'p50 ms':>8} {'TCP/unix':>8} "
          f"fail verified")
    for s in summary:
        unix = next((t for t in summary if t["milter"] == s["milter"] and t["mode"] == s["mode"]
                     and t["transport"] == "unix"), None)
        s["x_unix"] = round(s["msg_per_s"] / unix["msg_per_s"], 3) if unix and \
            unix["msg_per_s"] else None
        print(f"{s['milter']:<12} {s['mode']:<8} {s['transport']:<6} {s['msg_per_s']:>8.1f} "
              f"{s['p50_ms']:>8.1f} "
              f"{_x(s['x_unix'])}   {s['failures']:>3} {s['verified']}")
    return summary


# -- machine, plot, main -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    libmilter = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        libmilter = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libmilter1.0.1"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "libmilter1.0.1": libmilter,
            "pymilter": _env.PYMILTER_REQ, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def plot(summary: list[dict[str, Any]], venv_py: Path, out: Path, pin: str = "none") -> str:
    """Plot msg/s by connections in the venv (matplotlib is not a project dependency)."""
    data = [s for s in summary if s["pin"] == pin]
    script = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data, out = json.load(open(sys.argv[1])), sys.argv[2]
modes = sorted({d["mode"] for d in data}); bodies = sorted({d["body"] for d in data})
fig, axes = plt.subplots(len(bodies), len(modes), figsize=(5.2 * len(modes), 3.8 * len(bodies)),
                         squeeze=False)
style = {"c": ("k", "s"), "pymilter": ("tab:orange", "o"), "pymilterkit": ("tab:blue", "^"),
         "pymilterkit-w2": ("tab:green", "v"), "pymilter-1cpu": ("tab:red", "x"),
         "pymilterkit-anycpu": ("tab:cyan", "+"), "pymilterkit-empty-w2": ("tab:gray", ".")}
for i, body in enumerate(bodies):
    for j, mode in enumerate(modes):
        ax = axes[i][j]
        for name, (color, marker) in style.items():
            pts = sorted((d["conns"], d["msg_per_s"]) for d in data
                         if d["milter"] == name and d["mode"] == mode and d["body"] == body)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                        label=name)
        ax.set_title(f"{mode}, body {body // 1024} KiB")
        ax.set_xlabel("concurrent connections"); ax.set_ylabel("messages/s")
        ax.set_xticks(sorted({d["conns"] for d in data})); ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3); ax.legend(fontsize=8)
fig.suptitle("Recipient counter on libmilter, unix socket (pin: %s)" % sys.argv[3])
fig.tight_layout(); fig.savefig(out, dpi=110)
'''
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    try:
        r = subprocess.run([str(venv_py), "-c", script, f.name, str(out), pin],
                           capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    return "" if r.returncode == 0 else r.stderr.strip()[-500:]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a few seconds, 1 rep, 1 KiB, answered, small memory check")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per run")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per run")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (medians are reported)")
    ap.add_argument("--conns", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--bodies", type=int, nargs="+", default=[1024, 65536])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=None,
                    help="default: both (--quick: answered)")
    ap.add_argument("--milters", nargs="+", choices=MILTERS + OPTIONAL, default=list(MILTERS),
                    help="default: all but " + ", ".join(OPTIONAL))
    ap.add_argument("--pins", nargs="+", choices=list(PINS), default=["none", "split"])
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--memory-connections", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--idle", type=int, default=500, help="idle connections held open")
    ap.add_argument("--postfix", action="store_true", help="also run through a private Postfix "
                    "(root; unix vs TCP; pymilterkit vs pymilter)")
    ap.add_argument("--postfix-seconds", type=float, default=6.0)
    ap.add_argument("--postfix-conns", type=int, default=8)
    ap.add_argument("--postfix-reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None,
                    help="results file (default results/latest.json; --quick: build/quick.json)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "performance.png")
    ap.add_argument("--no-plot", dest="do_plot", action="store_false")
    ap.add_argument("--pymilter-python", type=Path, default=None,
                    help="an interpreter that has pymilter (default: the benchmark venv, "
                    "created on first use)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.reps = min(args.seconds, 0.4), 0.2, 1
        args.bodies, args.pins = [1024], ["none"]
        args.modes = args.modes or ["answered"]
        args.memory_connections, args.idle = [100, 1000], 50
    args.modes = args.modes or list(MODES)
    if args.json is None:
        args.json = BUILD / "quick.json" if args.quick else RESULTS / "latest.json"
    return args


def build() -> None:
    """make -C benchmarks; without make, the same two gcc commands."""
    if shutil.which("make"):
        subprocess.run(["make", "-s", "-C", str(HERE)], check=True)
        return
    BUILD.mkdir(exist_ok=True)
    flags = ["-O2", "-g", "-Wall", "-Wextra"]
    for prog, libs in (("rcptcount", ["-lmilter", "-lpthread"]), ("loadgen", ["-lpthread"])):
        src, out = HERE / "c" / f"{prog}.c", BUILD / prog
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["gcc", *flags, "-o", str(out), str(src), *libs], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    build()
    venv_py = args.pymilter_python or _env.ensure_venv()
    if args.do_plot and not args.quick and args.pymilter_python is None:
        _env.ensure_package(venv_py, "matplotlib")
    info = machine()
    print(f"machine: {info['nproc']} CPU(s), {info['cpu']}, Linux {info['kernel']}, "
          f"Python {info['python']}, libmilter {info['libmilter1.0.1']}, {info['pymilter']}")
    started_at = time.monotonic()
    calls = callbacks.measure(20_000 if args.quick else 300_000)
    print("\nPer-callback cost, called from C without a socket (benchmarks/callbacks.py):")
    print(callbacks.report(calls) + "\n", flush=True)
    try:
        rows = run_throughput(args, venv_py)
    finally:
        stop_echo()
    summary = summarise(rows)
    room = headroom(summary)
    mem: list[dict[str, Any]] = []
    if args.memory:
        names = ["pymilterkit"] if args.quick else ["c", "pymilter", "pymilterkit"]
        for name in names:
            mem.append(run_memory(name, venv_py, args.memory_connections, args.idle))
    pf_rows: list[dict[str, Any]] = []
    if args.postfix:
        pf_rows = run_postfix(args, venv_py)

    print_table(summary, args.seconds, args.reps)
    print_async(summary)
    print_splits(rows)
    print_headroom(room)
    if mem:
        print_memory(mem, args.memory_connections)
    pf_summary = print_postfix(pf_rows) if pf_rows else []
    failed_runs = sum(not ok(r) for r in rows)
    failures = sum(r.get("failures", 0) for r in rows)
    mem_failures = sum(r["short_connection_failures"] for r in mem)
    pf_failures = sum(r["failures"] for r in pf_rows)
    print(f"\n{len(rows)} runs, {sum(r.get('messages', 0) for r in rows)} messages verified, "
          f"{failures} failure(s), {failed_runs} failed run(s); memory failures {mem_failures}; "
          f"postfix failures {pf_failures}; {time.monotonic() - started_at:.0f} s")
    result = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()},
              "callbacks": calls, "summary": summary, "headroom": room, "memory": mem,
              "postfix": pf_summary, "postfix_runs": pf_rows, "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {args.json}")
    if args.do_plot and not args.quick and args.pymilter_python is None:
        err = plot(summary, venv_py, args.plot)
        print(f"plot: {args.plot}" if not err else f"plot failed: {err}")
    return 0 if not (failed_runs or mem_failures or pf_failures) else 1


if __name__ == "__main__":
    sys.exit(main())
