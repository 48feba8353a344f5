# ruff: noqa: RUF001 - the Markdown tables use the multiplication sign and en dash on purpose
"""Markdown tables from a results file of `run.py` (for docs/performance.md).

    python3 benchmarks/report.py [benchmarks/results/latest.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def throughput(summary: list[dict[str, Any]], pin: str) -> str:
    rows = [s for s in summary if s["pin"] == pin]
    out = [
        "| mode | conns | body | milter | msg/s | ×pymilter | ×C | p50 ms | p99 ms "
        "| CPU µs/msg | CPU ×pymilter | CPU ×C | failures |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        out.append(
            f"| {s['mode']} | {s['conns']} | {s['body'] // 1024} KiB | {s['milter']} "
            f"| {s['msg_per_s']:,.0f} | {_x(s['msg_per_s_x_pymilter'])} | {_x(s['msg_per_s_x_c'])} "
            f"| {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['milter_cpu_us_per_msg']:.1f} "
            f"| {_x(s['milter_cpu_us_per_msg_x_pymilter'])} "
            f"| {_x(s['milter_cpu_us_per_msg_x_c'])} | {s['failures']} |"
        )
    return "\n".join(out)


def headroom(rows: list[dict[str, Any]]) -> str:
    out = ["| pin | mode | conns | body | C msg/s | loadgen µs/msg | loadgen cores | C µs/msg |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for h in rows:
        out.append(f"| {h['pin']} | {h['mode']} | {h['conns']} | {h['body'] // 1024} KiB "
                   f"| {h['msg_per_s']:,.0f} | {h['loadgen_cpu_us_per_msg']:.1f} "
                   f"| {h['loadgen_cores']:.2f} | {h['milter_cpu_us_per_msg']:.1f} |")
    return "\n".join(out)


def splits(runs: list[dict[str, Any]]) -> str:
    """Each pre-forked run's connections per worker, with its msg/s (more than 1 connection)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("worker_connections") and r["conns"] > 1:
            key = (r["pin"], r["mode"], r["conns"], r["body"], r["milter"])
            groups.setdefault(key, []).append(r)
    if not groups:
        return "(no pre-forked runs)"
    out = ["| pin | mode | conns | body | milter | each run: connections per worker (msg/s) |",
           "|---|---|---:|---:|---|---|"]
    for (pin, mode, conns, body, name), rs in groups.items():
        each = ", ".join(f"{'/'.join(map(str, r['worker_connections']))} "
                         f"({r['msg_per_s']:,.0f})" for r in sorted(rs, key=lambda r: r["rep"]))
        out.append(f"| {pin} | {mode} | {conns} | {body // 1024} KiB | {name} | {each} |")
    return "\n".join(out)


def callbacks(r: dict[str, Any] | None) -> str:
    """The per-callback table of callbacks.py, with the empty-callback reference."""
    if not r:
        return "(not measured)"
    rows = [
        ("MAIL with `SIZE=`, `BODY=`", r["mail_params_us"], r["empty_argv_us"]),
        ("RCPT", r["rcpt_us"], r["empty_argv_us"]),
        ("EOM with `add_header`", r["eom_us"], r["empty_ctx_us"] + r["addheader_call_us"]),
        ("one message: MAIL, 3 × RCPT, EOM", r["message_us"], r["empty_message_us"]),
    ]
    out = ["| callback | pymilterkit µs | empty callback µs | ratio |", "|---|---:|---:|---:|"]
    for name, us, ref in rows:
        out.append(f"| {name} | {us:.3f} | {ref:.3f} | {us / ref:.2f} |")
    return "\n".join(out)


def memory(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(not measured)"
    shorts = sorted(int(k.split("_")[2]) for k in rows[0] if k.startswith("rss_after_"))
    head = " | ".join(f"after {n:,} conns" for n in shorts)
    out = [f"| milter | warm | {head} | growth | per idle connection | failures |",
           "|---|---:|" + "---:|" * len(shorts) + "---:|---:|---:|"]
    for r in rows:
        vals = " | ".join(f"{r[f'rss_after_{n}_kib'] / 1024:.1f} MB" for n in shorts)
        out.append(f"| {r['milter']} | {r['rss_warm_kib'] / 1024:.1f} MB | {vals} "
                   f"| {r['growth_kib'] / 1024:+.2f} MB "
                   f"| {r['rss_per_idle_connection_bytes'] / 1024:.1f} KiB "
                   f"| {r['short_connection_failures']} |")
    return "\n".join(out)


def postfix(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(not measured)"
    out = ["| milter | mode | milter socket | msg/s | p50 ms per message | TCP ÷ unix "
           "| failures | header checked |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['milter']} | {r.get('mode', 'noreply')} | {r['transport']} "
                   f"| {r['msg_per_s']:,.1f} "
                   f"| {r['p50_ms']:.1f} | {_x(r.get('x_unix'))} | {r['failures']} "
                   f"| {r['verified']} |")
    return "\n".join(out)


def asynchronous(summary: list[dict[str, Any]]) -> str:
    """The async rows against their sync twins, as `run.py` annotated them (`print_async`)."""
    rows = [s for s in summary if "x_sync_1" in s or "x_sync" in s]
    if not rows:
        return "(not measured)"
    out = ["| pin | mode | conns | body | milter | msg/s | ×sync (1 process) | ×sync twin "
           "| CPU µs/msg | CPU ×twin | CPU µs per suspension |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        x = s.get("x_sync") or {}
        per = s.get("cpu_us_per_suspension")
        out.append(f"| {s['pin']} | {s['mode']} | {s['conns']} | {s['body'] // 1024} KiB "
                   f"| {s['milter']} | {s['msg_per_s']:,.0f} | {_x(s.get('x_sync_1'))} "
                   f"| {_x(x.get('msg_per_s'))} | {s['milter_cpu_us_per_msg']:.1f} "
                   f"| {_x(x.get('milter_cpu_us_per_msg'))} | {'–' if per is None else per} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else HERE / "results" / "latest.json"
    data = json.loads(path.read_text())
    m = data["machine"]
    print(f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
          f"libmilter1.0.1 {m['libmilter1.0.1']}, {m['pymilter']}; commit {m['commit']}, "
          f"{m['date']}.\n")
    a = data["args"]
    print(f"Settings: {a['seconds']} s per run, {a['reps']} repetitions (medians), "
          f"warm-up {a['warmup']} s.\n")
    pins = [p for p in ("none", "split") if any(s["pin"] == p for s in data["summary"])]
    for pin in pins:
        print(f"### pin = {pin}\n")
        print(throughput(data["summary"], pin) + "\n")
    print("### async def on_rcpt against its sync twin\n")
    print(asynchronous(data["summary"]) + "\n")
    print("### Per callback, called from C (one thread, warm caches)\n")
    print(callbacks(data.get("callbacks")) + "\n")
    print("### Pre-forked workers: the split of the connections\n")
    print(splits(data["runs"]) + "\n")
    print("### Generator headroom\n")
    print(headroom(data["headroom"]) + "\n")
    print("### Memory\n")
    print(memory(data["memory"]) + "\n")
    print("### Through Postfix\n")
    print(postfix(data["postfix"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
