"""Reloads, recycling and a drained stop through a real Postfix, under continuous mail (15.4).

A throwaway Postfix (tests/e2e/postfix.py; milter_default_action = tempfail, so a milter
connection lost mid-message shows as a 4xx) sends through
`tests.integration.lifecycle_filters:Generation` (`--workers 2 --max-sessions-per-worker 200`)
while SMTP client threads send continuously. Meanwhile: 10 SIGHUP reloads, each with a message
in flight (its on_eom sleeps 1.5 s); then the load ends and a SIGTERM comes with one message
in flight (mail that reaches a stopping milter is tempfailed by Postfix: not counted here).
Counted: SMTP transactions refused or failed, messages delivered against accepted, each
in-flight message delivered with the code generation that was serving when it was sent,
workers recycled.

    sudo python3 benchmarks/lifecycle_postfix.py [--clients 4] [--reloads 10] [--gap 1.5]

Needs root (Postfix's master starts as root) and Debian's postfix.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pymilterkit.testing import MilterProcess  # noqa: E402
from tests.e2e.postfix import PostfixInstance, make_socket_dir  # noqa: E402

MESSAGE = b"From: a@example.net\r\nTo: b@example.com\r\nSubject: lifecycle\r\n\r\nbody\r\n"


def send(port: int, sender: str, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.sendmail(sender, [recipient], MESSAGE)  # raises on any 4xx/5xx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between events")
    parser.add_argument("--recycle", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pmk-lcpf-"))
    sock_dir = make_socket_dir(work)
    sock = sock_dir / "lifecycle.sock"
    generation = work / "generation"
    generation.write_text("g0")
    milter = MilterProcess(
        "tests.integration.lifecycle_filters:Generation", f"unix:{sock}", cwd=ROOT,
        args=["--workers", "2", "--max-sessions-per-worker", str(args.recycle),
              "--socket-group", "postfix", "--log-level", "INFO"],
        env={**os.environ, "PMK_GENERATION_FILE": str(generation),
             "PYTHONPATH": str(ROOT)},
    )
    accepted: list[str] = []
    failures: list[str] = []
    flights: dict[str, str] = {}  # recipient -> generation expected
    stop_load = threading.Event()
    lock = threading.Lock()

    def counted(port: int, sender: str, rcpt: str) -> None:
        """Send one message; note it as accepted or failed."""
        try:
            send(port, sender, rcpt)
        except Exception as exc:  # noqa: BLE001 - counted
            with lock:
                failures.append(f"{rcpt}: {exc!r}")
        else:
            with lock:
                accepted.append(rcpt)

    def client(number: int, port: int) -> None:
        k = 0
        while not stop_load.is_set():
            counted(port, "ok@example.net", f"c{number}-{k}@example.com")
            k += 1

    def in_flight(rcpt: str, port: int) -> threading.Thread:
        thread = threading.Thread(target=counted, args=(port, "sleep-1.5@example.net", rcpt))
        thread.start()
        return thread

    reload_times: list[float] = []
    with milter:
        postfix = PostfixInstance(f"unix:{sock}", {"milter_default_action": "tempfail"})
        postfix.start()
        try:
            port = postfix.smtp_port
            clients = [threading.Thread(target=client, args=(n, port))
                       for n in range(args.clients)]
            for thread in clients:
                thread.start()
            time.sleep(args.gap)
            for n in range(1, args.reloads + 1):
                rcpt = f"flight{n}@example.com"
                flights[rcpt] = f"g{n - 1}"
                flight = in_flight(rcpt, port)
                time.sleep(0.5)  # its on_eom sleeps now
                before = milter.log().count("reloaded in")
                generation.write_text(f"g{n}")
                started = time.monotonic()
                milter.signal(signal.SIGHUP)
                for _ in range(1200):
                    if milter.log().count("reloaded in") > before:
                        break
                    time.sleep(0.025)
                reload_times.append(time.monotonic() - started)
                flight.join(60)
                time.sleep(args.gap)
            # The stop: the load ends first (mail sent to a milter that is stopping is Postfix's
            # to tempfail: that is what a stop means), one message stays in flight.
            stop_load.set()
            for thread in clients:
                thread.join(60)
            flights["last@example.com"] = f"g{args.reloads}"
            last = in_flight("last@example.com", port)
            time.sleep(0.5)
            stop_started = time.monotonic()
            milter.signal(signal.SIGTERM)
            code = milter.wait(90)
            stop_seconds = time.monotonic() - stop_started
            last.join(60)
            log = milter.log()
            delivered = postfix.wait_for_delivery(len(accepted), timeout=120)
        finally:
            postfix.stop()
            postfix.cleanup()
    by_rcpt = {d.recipients[0]: str(d.message["X-Generation"]) for d in delivered}
    wrong_flights = {r: (g, by_rcpt.get(r)) for r, g in flights.items() if by_rcpt.get(r) != g}
    report = {
        "accepted": len(accepted),
        "failed": len(failures),
        "delivered": len(delivered),
        "accepted_not_delivered": len(set(accepted) - set(by_rcpt)),
        "reloads": log.count("reloaded in"),
        "recycled": log.count(" retires: "),
        "flights_ok": len(flights) - len(wrong_flights),
        "flights": len(flights),
        "wrong_flights": wrong_flights,
        "reload_s_median": sorted(reload_times)[len(reload_times) // 2] if reload_times else None,
        "reload_s_max": max(reload_times) if reload_times else None,
        "drained_stop_s": round(stop_seconds, 2),
        "exit": code,
        "first_failures": failures[:5],
    }
    print(json.dumps(report, indent=2))
    ok = (not failures and not wrong_flights and code == 0
          and report["accepted_not_delivered"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
