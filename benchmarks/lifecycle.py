"""Reloads, recycling and a drained stop under load: nothing lost, and how long each takes.

    make -C benchmarks
    PYTHONPATH=$PWD python benchmarks/lifecycle.py [--workers 2] [--reloads 10] [--recycle 200]

Runs `benchmarks.lifecycle_filter:Probe` (`pymilterkit run --workers N
--max-sessions-per-worker 200`) on a unix socket in a temp dir. The C load generator
(`build/loadgen -c 8 -m 1`: 8 connections, one message each, then a new connection; every reply
verified) runs while the script sends SIGHUP 10 times; before each SIGHUP a message is put in
flight (its on_eom sleeps 1 s) and must be accepted. After each SIGHUP a probe message is sent
every 20 ms until one is answered by the new code (`X-Generation`): the reload time. When loadgen
is done, 8 messages are put in flight and one SIGTERM is sent: the drained-stop time is from the
signal to the exit of the milter, and each of the 8 must be accepted. Prints one JSON object;
exit 1 if any message failed, was answered wrongly, or the milter did not exit 0.

`--stop-times N`: instead, N idle stops (SIGTERM to exit, after 20 messages) in each of three
configurations: one process, `--workers 2`, and (as root) `--user nobody --socket-group root`,
a socket the milter's own user may not connect to; prints the median and max per configuration.
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
import threading
import time
from pathlib import Path

from pymilterkit import Status
from pymilterkit.testing import MilterClient, MilterProcess

ROOT = Path(__file__).resolve().parents[1]
LOADGEN = ROOT / "benchmarks" / "build" / "loadgen"
MESSAGE = b"Subject: lifecycle\r\n\r\nbody\r\n"


def in_flight(socket: str, seconds: float, results: list[bool]) -> threading.Thread:
    def send() -> None:
        try:
            result = MilterClient(socket, timeout=60).run(
                MESSAGE, sender=f"sleep-{seconds}@example.net", recipients=["a@example.org"]
            )
            results.append(result.status == Status.CONTINUE
                           and result.header("X-Rcpt-Count") == "1")
        except Exception:  # noqa: BLE001 - counted as a failure
            results.append(False)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def generation_of(client: MilterClient) -> str | None:
    result = client.run(MESSAGE, sender="generation@example.net", recipients=["a@example.org"])
    if result.status != Status.CONTINUE or result.header("X-Rcpt-Count") != "1":
        raise AssertionError(f"wrong answer: {result}")
    return result.header("X-Generation")


def stop_times(rounds: int) -> int:
    configs: dict[str, list[str]] = {"single": [], "workers2": ["--workers", "2"]}
    if os.geteuid() == 0:
        configs["user-nobody, socket-group root"] = ["--user", "nobody", "--socket-group", "root"]
    report: dict[str, dict[str, float]] = {}
    for label, args in configs.items():
        times = []
        for _ in range(rounds):
            with MilterProcess("benchmarks.lifecycle_filter:Probe", args=args, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}) as milter:
                client = MilterClient(milter.socket, timeout=10)
                if label.startswith("user"):
                    time.sleep(0.5)
                else:
                    for _ in range(20):
                        generation_of(client)
                start = time.monotonic()
                milter.signal(signal.SIGTERM)
                if milter.wait(60) != 0:
                    print(milter.log(), file=sys.stderr)
                    return 1
                times.append(time.monotonic() - start)
        report[label] = {"median_s": round(statistics.median(times), 3),
                         "max_s": round(max(times), 3)}
    print(json.dumps(report, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--recycle", type=int, default=200)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--stop-times", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.stop_times:
        return stop_times(args.stop_times)
    if not LOADGEN.exists():
        subprocess.run(["make", "-C", str(ROOT / "benchmarks")], check=True)
    tmp = tempfile.TemporaryDirectory(prefix="pmk-lifecycle-")
    gen = Path(tmp.name) / "generation"
    gen.write_text("0")
    env = {**os.environ, "PMK_GENERATION_FILE": str(gen), "PYTHONPATH": str(ROOT)}
    milter = MilterProcess(
        "benchmarks.lifecycle_filter:Probe",
        args=["--workers", str(args.workers), "--max-sessions-per-worker", str(args.recycle)],
        cwd=ROOT, env=env,
    )
    milter.start()
    probe = MilterClient(milter.socket, timeout=30)
    flights: list[bool] = []
    reload_times: list[float] = []
    wrong = 0
    load = subprocess.Popen(
        [str(LOADGEN), "-s", milter.socket, "-c", str(args.conns), "-m", "1",
         "-d", str(4.0 * args.reloads + 4)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(2)
        for n in range(1, args.reloads + 1):
            flight = in_flight(milter.socket, 1.0, flights)
            time.sleep(0.3)
            gen.write_text(str(n))
            start = time.monotonic()
            milter.signal(signal.SIGHUP)
            while True:
                try:
                    if generation_of(probe) == str(n):
                        break
                except AssertionError:
                    wrong += 1
                if time.monotonic() - start > 60:
                    raise SystemExit(f"reload {n}: new code never answered")
                time.sleep(0.02)
            reload_times.append(time.monotonic() - start)
            flight.join(60)
            time.sleep(max(0.0, 4.0 - (time.monotonic() - start)))
        out, _ = load.communicate(timeout=120)
        stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        stop_flights: list[bool] = []
        threads = [in_flight(milter.socket, 1.0, stop_flights) for _ in range(8)]
        time.sleep(0.3)
        start = time.monotonic()
        milter.signal(signal.SIGTERM)
        code = milter.wait(120)
        stop_time = time.monotonic() - start
        for t in threads:
            t.join(60)
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
        milter.stop()
    log = milter.log()
    if os.environ.get("PMK_LIFECYCLE_LOG"):
        Path(os.environ["PMK_LIFECYCLE_LOG"]).write_text(log)
    report = {
        "workers": args.workers,
        "reloads": args.reloads,
        "recycle_every": args.recycle,
        "loadgen": {k: stats.get(k)
                    for k in ("messages", "failures", "conn_errors", "seconds", "msg_per_s")},
        "loadgen_exit": load.returncode,
        "wrong_answers": wrong,
        "in_flight_during_reload_ok": f"{sum(flights)}/{len(flights)}",
        "in_flight_during_stop_ok": f"{sum(stop_flights)}/{len(stop_flights)}",
        "reload_until_new_code_s": {
            "median": round(statistics.median(reload_times), 3),
            "max": round(max(reload_times), 3),
        },
        "drained_stop_s (1 s messages in flight)": round(stop_time, 3),
        "retirements": log.count(" retires: "),
        "reloads_logged": log.count("reloaded in"),
        "reloads_failed": log.count("reload failed"),
        "reloads_refused": log.count("already under way"),
        "milter_exit": code,
        "tracebacks": log.count("Traceback"),
    }
    print(json.dumps(report, indent=1))
    ok = (load.returncode == 0 and not stats.get("failures") and not stats.get("conn_errors")
          and wrong == 0 and all(flights) and all(stop_flights) and code == 0
          and report["tracebacks"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
