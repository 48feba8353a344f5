"""Record and replay behind a real Postfix: `--record` on `--workers 2` with a reload in the
middle records every SMTP session whole; replayed against the same filter nothing changes,
against its next version (`Stricter`) exactly the messages it decides otherwise, with their old
and new verdicts."""

from __future__ import annotations

import json
import signal
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from pymilterkit.__main__ import main
from pymilterkit.testing import Recording

from .mta import Setup, Start

pytestmark = pytest.mark.e2e


def mail(subject: str, body: str = "Hello.\r\n") -> bytes:
    return (f"From: a@example.net\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"X-Remove: x\r\n\r\n{body}").encode()


# (sender, recipients, subject, body, what the SMTP client sees)
TRAFFIC = [
    ("a@example.net", ["b@example.com", "c@example.com"], "plain", "Hello.\r\n", "ok"),
    ("a@example.net", ["nobody@example.com", "later@example.com", "b@example.com"],
     "mixed rcpts", "Hello.\r\n", "partly"),
    ("reject-mail@example.net", ["b@example.com"], "no", "Hello.\r\n", "refused"),
    ("a@example.net", ["b@example.com"], "EOM-REJECT", "Hello.\r\n", "refused"),
    ("accept@example.net", ["b@example.com"], "vip", "Hello.\r\n", "ok"),
    ("discard@example.net", ["b@example.com"], "dropped", "Hello.\r\n", "ok"),
    ("a@example.net", ["b@example.com", "gone@example.com"], "EVERY action", "Long.\r\n" * 900,
     "ok"),
    ("a@example.net", ["b@example.com"], "x", "BODY-TEMPFAIL\r\n", "refused"),
    ("a@example.net", ["b@example.com"], "HEADER-REJECT", "Hello.\r\n", "refused"),
    ("a@example.net", ["b@example.com"], "EOM-ACCEPT", "Hello.\r\n", "ok"),
    ("a@example.net", ["later@example.com", "b@example.com"], "late", "Hello.\r\n", "partly"),
]
CHANGED = {"mixed rcpts", "EOM-ACCEPT", "late"}  # as tests.record_filters.STRICTER_CHANGES


def send_all(setup: Setup) -> None:
    for sender, recipients, subject, body, seen in TRAFFIC:
        try:
            refused = setup.send(mail(subject, body), recipients, sender=sender)
            assert seen != "refused", subject
            assert bool(refused) == (seen == "partly"), (subject, refused)
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError,
                smtplib.SMTPRecipientsRefused):
            assert seen == "refused", subject


def replay(directory: Path, target: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code = main(["replay", "--json", str(directory), "--filter", f"tests.record_filters:{target}"])
    return code, json.loads(capsys.readouterr().out)


def test_postfix_traffic_recorded_across_a_reload_replays_exactly(
    start: Start, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "recordings"
    setup = start("tests.record_filters:Decider",
                  args=["--workers", "2", "--record", str(directory)])
    send_all(setup)
    setup.milter.signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while "reloaded in" not in setup.milter.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reloaded in" in setup.milter.log()
    send_all(setup)
    setup.postfix.wait_for_delivery(10)
    assert setup.milter.stop() == 0
    files = sorted(directory.iterdir())
    assert [f for f in files if not f.name.endswith(".milterlog")] == []
    recordings = [Recording.load(f) for f in files]
    assert all(r.complete for r in recordings)
    assert len({r.head["pid"] for r in recordings}) >= 2  # workers before and after the reload
    outcomes = [o for r in recordings for o in r.recorded]
    assert len(outcomes) == 2 * len(TRAFFIC)
    verdicts = {(o.status.name, o.stage) for o in outcomes}
    assert verdicts >= {("CONTINUE", "eom"), ("REJECT", "mail"), ("REJECT", "eom"),
                        ("TEMPFAIL", "body"), ("REJECT", "header"), ("ACCEPT", "mail"),
                        ("DISCARD", "mail")}

    code, same = replay(directory, "Decider", capsys)
    assert (code, same["summary"]) == (
        0, {"same": 22, "changed": 0, "failed": 0, "unsure": 0}), same

    code, changed = replay(directory, "Stricter", capsys)
    assert code == 1
    assert changed["summary"] == {"same": 16, "changed": 6, "failed": 0, "unsure": 0}
    assert {m["subject"] for m in changed["messages"] if m["result"] == "changed"} == CHANGED
    for item in changed["messages"]:
        if item["subject"] == "EOM-ACCEPT":
            assert (item["recorded"][0], item["new"][0]) == ("CONTINUE at eom", "ACCEPT at eom")
        if item["subject"] in ("mixed rcpts", "late"):
            assert "rcpt <later@example.com>: TEMPFAIL" in item["recorded"]
            assert "rcpt <later@example.com>: REJECT 550 5.1.1 gone for good" in item["new"]
