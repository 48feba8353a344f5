"""Reloads, recycling and a drained stop under a real Postfix: no message lost (issue 15.4).

Postfix (milter_default_action = tempfail, so a lost milter connection would show as a 4xx)
sends through `tests.integration.lifecycle_filters:Generation` on `--workers 2
--max-sessions-per-worker 5`: three SIGHUP reloads, each with a message in flight (its on_eom
sleeps), recycling every 5 sessions throughout, and a SIGTERM with a message in flight.
Every SMTP transaction must be accepted and every message delivered, each stamped by the code
generation that filtered it.
"""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from pymilterkit.testing import MilterProcess
from tests.e2e.conftest import milter_socket_dir, postfix_factory
from tests.e2e.postfix import PostfixFactory

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]
__all__ = ["milter_socket_dir", "postfix_factory"]  # fixtures used here

MESSAGE = b"From: a@example.net\r\nTo: b@example.com\r\nSubject: lifecycle\r\n\r\nbody\r\n"


def send(port: int, sender: str, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.sendmail(sender, [recipient], MESSAGE)  # raises on any 4xx/5xx


def test_reloads_recycling_and_a_drained_stop_lose_no_mail(
    postfix_factory: PostfixFactory, milter_socket_dir: Path, tmp_path: Path
) -> None:
    sock = milter_socket_dir / "lifecycle.sock"
    generation = tmp_path / "generation"
    generation.write_text("g0")
    milter = MilterProcess(
        "tests.integration.lifecycle_filters:Generation", f"unix:{sock}", cwd=ROOT,
        args=["--workers", "2", "--max-sessions-per-worker", "5", "--socket-group", "postfix"],
        env={**os.environ, "PMK_GENERATION_FILE": str(generation)},
    )
    errors: list[BaseException] = []

    def in_flight(recipient: str) -> threading.Thread:
        def run() -> None:
            try:
                send(postfix.smtp_port, "sleep-1.5@example.net", recipient)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    sent = 0
    with milter:
        postfix = postfix_factory(f"unix:{sock}", {"milter_default_action": "tempfail"})
        for n in range(1, 4):
            flight = in_flight(f"flight{n}@example.com")
            time.sleep(0.7)  # its on_eom sleeps now
            generation.write_text(f"g{n}")
            milter.signal(signal.SIGHUP)
            # Recycling every 5 sessions meanwhile: at most 4 workers (2 old, 2 new) serve
            # until one retires, so 21 sessions make one of them reach its 5th for certain.
            for k in range(21):
                send(postfix.smtp_port, "ok@example.net", f"r{n}-{k}@example.com")
                sent += 1
            flight.join(60)
            # The next flight must meet this reload's code: wait (bounded) until it serves.
            for _ in range(600):
                if milter.log().count("reloaded in") == n:
                    break
                time.sleep(0.05)
        last = in_flight("last@example.com")
        time.sleep(0.7)
        milter.signal(signal.SIGTERM)
        last.join(60)
        assert milter.wait(60) == 0, milter.log()
        log = milter.log()
    assert not errors, errors
    delivered = postfix.wait_for_delivery(sent + 4, timeout=60)
    by_rcpt = {d.recipients[0]: str(d.message["X-Generation"]) for d in delivered}
    assert len(by_rcpt) == sent + 4
    for n in range(1, 4):  # in flight during reload n: filtered by the code before it
        assert by_rcpt[f"flight{n}@example.com"] == f"g{n - 1}"
    assert by_rcpt["last@example.com"] == "g3"
    assert log.count("reloaded in") == 3 and " retires: " in log
    assert "Traceback" not in log
