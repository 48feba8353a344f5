"""Several pymilterkit instances behind HAProxy, through a real Postfix: throughput, failover,
rolling restart. Needs root (the throwaway Postfix) and Debian's ``haproxy``.

    python3 benchmarks/haproxy_fleet.py                  # ~2-3 minutes on 2 cores
    python3 benchmarks/haproxy_fleet.py --messages 3000 --reps 5
    python3 benchmarks/haproxy_fleet.py --quick          # smoke run, figures not worth quoting
    python3 benchmarks/haproxy_fleet.py --phases failover rolling   # the rest kept from --out

The topology is the one of ``tests/e2e/test_haproxy.py`` (``tests/e2e/haproxy.py``): Postfix ->
HAProxy (TCP mode, leastconn, health checks) -> three instances of the recipient counter
(``tests.e2e.haproxy_filters:HaproxyTagged``) on 127.0.0.2-4, and an LMTP sink that receives
every delivered message; SMTP clients are threads with smtplib, SMTP sessions of
``--per-session`` messages (one milter connection each, as Postfix opens them).

0. **The example filters**: each alone behind Postfix (no HAProxy), the milter's CPU per
   message (utime+stime from ``/proc``) and so its messages per second per core; the recipient
   counter also with 1 and 20 messages per SMTP session, to split its cost per connection and
   per message (the input of docs/capacity.md).
1. **Throughput**: ``--messages`` messages through 1, 2 and 3 instances (the others set to
   ``maint`` through HAProxy's runtime API), beside the same load from a second Postfix whose
   milter is one instance directly (no HAProxy: the reference), interleaved over ``--reps``
   repetitions; medians. Per phase: the milter connections HAProxy gave each instance (``stot``
   from ``show stat``), the messages each instance signed (``X-Served-By`` in the delivered
   mail), and the CPU each party spent per message (Postfix's processes, HAProxy, the milters,
   this process = SMTP clients and sink), which shows what bounds the figure.
2. **Failover**: SIGKILL one instance under load, restart it; the counts.
3. **Rolling restart**: each instance drained, stopped, restarted in turn under load; the counts.
   ``--drain runtime-api``: HAProxy's ``set server ... state drain``; ``sigterm``: the runner's
   own drain (SIGTERM, ``/healthz`` 503, ``--drain-timeout``), with HTTP checks on ``/healthz``;
   default: both where the runner has ``--metrics`` and ``--drain-timeout``, else the first.

Results: printed, and written to ``benchmarks/results/haproxy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.haproxy import (  # noqa: E402
    Instance,
    LmtpSink,
    Load,
    SinkPostfix,
    Topology,
    check_deliveries,
    failover,
    port_free_on_all,
    rolling_restart,
)

# The example filters, for the CPU each spends per message behind a real Postfix.
FILTERS = (
    ("rcpt_count", "examples.rcpt_count:RcptCount"),
    ("tagger", "examples.tagger:Tagger"),
    ("footer", "examples.footer:Footer"),
    ("policy", "examples.policy:ConnectionPolicy"),
    ("routing", "examples.routing:Routing"),
    ("audited_tagger", "examples.mixins:AuditedTagger"),
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASES = ("filters", "throughput", "failover", "rolling")


def _cpu_of(pid: int, children: bool = False) -> float:
    """utime+stime (and, with ``children``, reaped children's) of ``pid``, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds per party: Postfix (master + reaped + live daemons), HAProxy, milters, us."""

    def __init__(self, topo: Topology, postfix: SinkPostfix) -> None:
        self.topo, self.postfix = topo, postfix

    def sample(self) -> dict[str, float]:
        master = self.postfix.master_pid
        postfix = _cpu_of(master, children=True) if master else 0.0
        postfix += sum(_cpu_of(pid) for pid in self.postfix.processes() if pid != master)
        haproxy = self.topo.haproxy.process
        return {
            "postfix": postfix,
            "haproxy": _cpu_of(haproxy.pid) if haproxy is not None else 0.0,
            "milters": sum(_cpu_of(i.pid) for i in self.topo.fleet if i.process is not None),
            "clients+sink": _own_cpu(),
        }


def _busy_cpus() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def measure(topo: Topology, postfix: SinkPostfix, phase: str, messages: int,
            concurrency: int, per_session: int, rep: int) -> dict[str, Any]:
    """One load of ``messages`` through ``postfix``; msg/s, spread and CPU per message."""
    meter = CpuMeter(topo, postfix)
    topo.sink.clear()  # (every earlier load was fully delivered: check_deliveries waited)
    before_sessions = topo.haproxy.total_sessions()
    before_cpu = meter.sample()
    busy0, total0 = _busy_cpus()
    load = Load(postfix.smtp_port, messages, concurrency, per_session, prefix=f"{phase}-{rep}-")
    outcomes = load.run()
    busy1, total1 = _busy_cpus()
    served = check_deliveries(outcomes, topo.sink, timeout=120)
    after_cpu = meter.sample()
    after_sessions = topo.haproxy.total_sessions()
    accepted = sum(o.accepted for o in outcomes)
    sessions = {k: after_sessions[k] - before_sessions[k] for k in after_sessions}
    return {
        "phase": phase, "rep": rep, "messages": len(outcomes), "accepted": accepted,
        "failures": len(outcomes) - accepted, "msg_per_s": round(load.rate(), 1),
        "haproxy_sessions": sessions if phase != "direct" else {},
        "signed_by": dict(sorted(Counter(served[o.key] for o in outcomes
                                         if o.accepted).items())),
        "cpu_ms_per_msg": {k: round((after_cpu[k] - before_cpu[k]) * 1000 / max(1, accepted), 3)
                           for k in after_cpu},
        "machine_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
    }


def set_instances(topo: Topology, active: int) -> None:
    """The first ``active`` instances in service, the others in maintenance."""
    for index, instance in enumerate(topo.fleet):
        topo.haproxy.set_state(instance.name, "ready" if index < active else "maint")
    for index, instance in enumerate(topo.fleet):
        topo.haproxy.wait_status(instance.name, "UP" if index < active else "MAINT")


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with Topology() as topo:
        first = topo.fleet.instances[0]
        direct = SinkPostfix(f"inet:{first.host}:{first.port}", topo.sink.port)
        direct.start()
        try:
            assert topo.postfix is not None
            phases: list[tuple[str, SinkPostfix, int]] = [
                ("direct", direct, 1), ("1", topo.postfix, 1), ("2", topo.postfix, 2),
                ("3", topo.postfix, 3)]
            for name, postfix, active in phases:  # warm-up: every smtpd, cleanup, lmtp
                set_instances(topo, 3 if name == "direct" else active)
                measure(topo, postfix, f"warm{name}", min(300, args.messages), args.concurrency,
                        args.per_session, 0)
            for rep in range(args.reps):
                order = phases[rep % len(phases):] + phases[:rep % len(phases)]
                for name, postfix, active in order:
                    set_instances(topo, 3 if name == "direct" else active)
                    row = measure(topo, postfix, name, args.messages, args.concurrency,
                                  args.per_session, rep)
                    rows.append(row)
                    print(f"rep {rep} {name:>6}: {row['msg_per_s']:7.1f} msg/s, failures "
                          f"{row['failures']}, HAProxy sessions {row['haproxy_sessions']}, "
                          f"signed {row['signed_by']}, CPU ms/msg {row['cpu_ms_per_msg']}, "
                          f"machine busy {row['machine_busy']:.0%}", flush=True)
            set_instances(topo, 3)
        finally:
            direct.cleanup()
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    direct = statistics.median(r["msg_per_s"] for r in rows if r["phase"] == "direct")
    for phase in ("direct", "1", "2", "3"):
        mine = [r for r in rows if r["phase"] == phase]
        rate = statistics.median(r["msg_per_s"] for r in mine)
        sessions: Counter[str] = Counter()
        signed: Counter[str] = Counter()
        for r in mine:
            sessions.update(r["haproxy_sessions"])
            signed.update(r["signed_by"])
        cpu = {k: round(statistics.median(r["cpu_ms_per_msg"][k] for r in mine), 3)
               for k in mine[0]["cpu_ms_per_msg"]}
        out.append({
            "phase": phase, "msg_per_s": rate, "x_direct": round(rate / direct, 2),
            "runs": [r["msg_per_s"] for r in mine], "failures": sum(r["failures"] for r in mine),
            "haproxy_sessions": dict(sorted(sessions.items())),
            "signed_by": dict(sorted(signed.items())), "cpu_ms_per_msg": cpu,
            "machine_busy": statistics.median(r["machine_busy"] for r in mine),
        })
    return out


def print_summary(summary: list[dict[str, Any]]) -> None:
    print("\n| path | msg/s (median) | x direct | runs | failures | milter connections per "
          "instance (HAProxy stot) | messages signed per instance | CPU ms/msg: Postfix, "
          "HAProxy, milters, clients+sink | CPUs busy |")
    print("|---|---:|---:|---|---:|---|---|---|---:|")
    for s in summary:
        label = ("Postfix -> 1 instance, no HAProxy" if s["phase"] == "direct"
                 else f"Postfix -> HAProxy -> {s['phase']} instance(s)")
        cpu = s["cpu_ms_per_msg"]
        print(f"| {label} | {s['msg_per_s']:,.1f} | {s['x_direct']:.2f} | "
              f"{', '.join(f'{x:.0f}' for x in s['runs'])} | {s['failures']} | "
              f"{_fmt(s['haproxy_sessions'])} | {_fmt(s['signed_by'])} | "
              f"{cpu['postfix']:.2f}, {cpu['haproxy']:.2f}, {cpu['milters']:.2f}, "
              f"{cpu['clients+sink']:.2f} | {s['machine_busy']:.0%} |")


def _fmt(counts: dict[str, int]) -> str:
    return " / ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def filter_costs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each example filter as one instance behind one Postfix (no HAProxy): its CPU per message.

    The recipient counter also runs with 1 and 20 messages per SMTP session (one milter
    connection each), which splits its cost into per connection and per message.
    """
    configs = [(label, target, args.per_session) for label, target in FILTERS]
    configs += [("rcpt_count", FILTERS[0][1], 1), ("rcpt_count", FILTERS[0][1], 20)]
    host = "127.0.0.2"
    port = port_free_on_all([host])
    sink = LmtpSink().start()
    postfix = SinkPostfix(f"inet:{host}:{port}", sink.port)
    postfix.start()
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(args.reps):
            for label, target, per_session in configs:
                instance = Instance(label, host, port, None, target=target).start()
                try:
                    Load(postfix.smtp_port, 200, args.concurrency, per_session,
                         prefix=f"w{label}{per_session}-{rep}-").run()
                    cpu0 = _cpu_of(instance.pid)
                    load = Load(postfix.smtp_port, args.messages, args.concurrency, per_session,
                                prefix=f"{label}{per_session}-{rep}-")
                    outcomes = load.run()
                    cpu1 = _cpu_of(instance.pid)
                finally:
                    instance.stop()
                accepted = sum(o.accepted for o in outcomes)
                sink.wait_for(accepted, 120)
                sink.clear()
                ms = (cpu1 - cpu0) * 1000 / max(1, accepted)
                runs.append({"filter": label, "per_session": per_session, "rep": rep,
                             "accepted": accepted, "failures": len(outcomes) - accepted,
                             "msg_per_s": round(load.rate(), 1), "milter_ms_per_msg": ms})
                print(f"rep {rep} {label:<15} {per_session:>2} msg/session: "
                      f"{load.rate():6.1f} msg/s, milter {ms:.3f} ms CPU/msg "
                      f"({1000 / ms if ms else 0:,.0f} msg/s per core), "
                      f"failures {len(outcomes) - accepted}", flush=True)
    finally:
        postfix.cleanup()
        sink.stop()
    summary = []
    for label, _target, per_session in configs:
        mine = [r for r in runs if r["filter"] == label and r["per_session"] == per_session]
        ms = statistics.median(r["milter_ms_per_msg"] for r in mine)
        summary.append({"filter": label, "per_session": per_session,
                        "milter_ms_per_msg": round(ms, 3),
                        "msg_per_s_per_core": round(1000 / ms) if ms else None,
                        "msg_per_s_through_postfix": statistics.median(
                            r["msg_per_s"] for r in mine),
                        "failures": sum(r["failures"] for r in mine)})
    by_session = {s["per_session"]: s["milter_ms_per_msg"] for s in summary
                  if s["filter"] == "rcpt_count"}
    if 1 in by_session and 20 in by_session:  # ms/msg = message + connection / per_session
        connection = (by_session[1] - by_session[20]) / (1 - 1 / 20)
        summary.append({"filter": "rcpt_count split", "per_connection_ms": round(connection, 3),
                        "per_message_ms": round(by_session[1] - connection, 3)})
    print("\n| filter | messages per SMTP session | milter CPU ms/msg | msg/s per core |")
    print("|---|---:|---:|---:|")
    for row in summary:
        if "per_session" in row:
            print(f"| {row['filter']} | {row['per_session']} | {row['milter_ms_per_msg']:.3f} | "
                  f"{row['msg_per_s_per_core']:,} |")
        else:
            print(f"rcpt_count: {row['per_connection_ms']} ms per milter connection + "
                  f"{row['per_message_ms']} ms per message")
    return [*summary, {"runs": runs}]


def run_failover(args: argparse.Namespace) -> dict[str, Any]:
    print("== failover (SIGKILL m2 under load, restart)", flush=True)
    half = args.failover_messages // 2
    with Topology(health="http") as topo:
        report = failover(topo, "m2", before=half, after=half,
                          concurrency=args.concurrency, per_session=args.per_session)
        fail = report.summary()
        fail["check"] = {"inter_ms": topo.haproxy.check_inter_ms, "fall": topo.haproxy.fall,
                         "rise": topo.haproxy.rise, "health": topo.haproxy.health}
        retried = [Load(topo.smtp_port, 0).send_one(o.key) for o in report.failures]
        fail["retried_and_accepted"] = sum(o.accepted for o in retried)
        everything = check_deliveries(
            [o for o in report.outcomes if o.accepted] + retried, topo.sink)
        fail["delivered_after_retry"] = len(everything)
    return fail


def run_rolling(args: argparse.Namespace, via: str) -> dict[str, Any]:
    sigterm = via == "sigterm"
    with Topology(health="http" if runner_has("--metrics") else "tcp",
                  milter_args=["--drain-timeout", "30"] if sigterm else ()) as topo:
        result = rolling_restart(topo, "sigterm" if sigterm else "runtime-api",
                                 concurrency=args.concurrency, per_session=args.per_session)
        summary = result.summary()
        summary["health"] = topo.haproxy.health
        # What HAProxy saw take each instance out: its 503 while draining, or the process gone.
        summary["haproxy_down_reasons"] = dict(Counter(
            line.split("reason: ", 1)[1].split(",")[0]
            for line in topo.haproxy.log_text().splitlines()
            if " is DOWN, reason: " in line and line.startswith("[WARNING]")))
        return summary


def runner_has(option: str) -> bool:
    result = subprocess.run([sys.executable, "-m", "pymilterkit", "run", "--help"],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    return option in result.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="per throughput run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=12, help="SMTP clients")
    ap.add_argument("--per-session", type=int, default=5, help="messages per SMTP session")
    ap.add_argument("--failover-messages", type=int, default=3000)
    ap.add_argument("--drain", choices=("runtime-api", "sigterm", "both", "auto"),
                    default="auto")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                    help="run only these; the others' figures are kept from --out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "haproxy.json")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.reps, args.failover_messages = 300, 1, 600
    if os.geteuid() != 0:
        sys.exit("needs root: the throwaway Postfix's master runs as root")
    started = time.monotonic()
    has_drain = runner_has("--drain-timeout") and runner_has("--metrics")
    drains = {"auto": ["runtime-api", "sigterm"] if has_drain else ["runtime-api"],
              "both": ["runtime-api", "sigterm"]}.get(args.drain, [args.drain])

    kept: dict[str, Any] = {}
    if set(args.phases) != set(PHASES) and args.out.exists():
        kept = json.loads(args.out.read_text())
    filters: list[dict[str, Any]] = kept.get("filters", [])
    if "filters" in args.phases:
        print("== the example filters: milter CPU per message through Postfix", flush=True)
        filters = filter_costs(args)

    rows: list[dict[str, Any]] = kept.get("throughput_runs", [])
    summary: list[dict[str, Any]] = kept.get("throughput", [])
    if "throughput" in args.phases:
        print("== throughput", flush=True)
        rows = throughput(args)
        summary = summarize(rows)

    fail: dict[str, Any] = kept.get("failover", {})
    if "failover" in args.phases:
        fail = run_failover(args)
        print(json.dumps(fail), flush=True)

    rolling: list[dict[str, Any]] = kept.get("rolling", [])
    if "rolling" in args.phases:
        rolling = []
        for via in drains:
            print(f"== rolling restart, drain by {via}", flush=True)
            rolling.append(run_rolling(args, via))
            print(json.dumps(rolling[-1]), flush=True)

    if summary:
        print_summary(summary)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT, check=False).stdout.strip()
    haproxy_version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True,
                                     check=False).stdout.split("\n")[0]
    result_doc = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "haproxy": haproxy_version,
                    "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                            time.gmtime())},
        "settings": {"messages": args.messages, "reps": args.reps,
                     "concurrency": args.concurrency, "per_session": args.per_session,
                     "failover_messages": args.failover_messages},
        "filters": filters, "throughput": summary, "throughput_runs": rows,
        "failover": fail, "rolling": rolling,
        "phase_dates": {**kept.get("phase_dates", {}), **{
            phase: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) for phase in args.phases}},
        "seconds": round(time.monotonic() - started, 1),
    }
    if not args.quick:
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(result_doc, indent=1) + "\n")
        print(f"written to {args.out}")
    print(f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
