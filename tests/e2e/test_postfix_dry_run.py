"""`--dry-run` behind a real Postfix: the mail arrives as it was sent; the milter's log says
what the filter would have done, under Postfix's queue id."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pymilterkit.testing import MilterProcess

from .postfix import PostfixFactory, PostfixInstance
from .test_postfix_milter import message

ROOT = Path(__file__).resolve().parents[2]

Start = Callable[[str], tuple[MilterProcess, PostfixInstance]]


@pytest.fixture
def start_dry(postfix_factory: PostfixFactory, milter_socket_dir: Path) -> Iterator[Start]:
    """`start_dry("module:Class")`: the filter with --dry-run on a unix socket, and a Postfix."""
    processes: list[MilterProcess] = []

    def make(target: str) -> tuple[MilterProcess, PostfixInstance]:
        path = milter_socket_dir / f"d{len(processes)}.sock"
        process = MilterProcess(
            target, f"unix:{path}", args=["--socket-mode", "666", "--dry-run"], cwd=ROOT
        )
        processes.append(process)
        process.start()
        return process, postfix_factory(f"unix:{path}")

    yield make
    for process in processes:
        process.stop()
        print(f"--- milter log ({process.target}) ---\n{process.log()}")  # shown on failure
        process.__exit__(None, None, None)


def send(postfix: PostfixInstance, msg: bytes, recipients: list[str], sender: str) -> None:
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.example.net")
        assert smtp.sendmail(sender, recipients, msg) == {}


def test_routing_in_dry_run_changes_nothing_and_logs_every_change(start_dry: Start) -> None:
    milter, postfix = start_dry("examples.mixins:AuditedRouting")
    recipients = ["sales@example.com", "noreply@example.org", "bob@example.com"]
    sent = message("order")
    send(postfix, sent, recipients, sender="carol@legacy.example.net")
    [delivered] = postfix.wait_for_delivery(1)
    # Unmodified: envelope and message as sent (Postfix adds only its own trace headers).
    assert sorted(delivered.recipients) == sorted(recipients)
    assert delivered.sender == "carol@legacy.example.net"
    assert "X-Audit" not in delivered.message
    assert delivered.message["Subject"] == "order"
    body = sent.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    assert delivered.raw.endswith(body)

    milter.stop()
    log = milter.log()
    tag = f"queue_id={delivered.queue_id} stage=on_eom: dry-run: would"
    assert f"{tag} add_recipient <archive@example.com>" in log, log
    assert f"{tag} remove_recipient <noreply@example.org>" in log
    assert f"{tag} change_sender <carol@example.com>" in log
    assert (
        f"{tag} add_header X-Audit: AuditedRouting on mta.pymilterkit.test "
        f"queue-id={delivered.queue_id}; client=localhost [127.0.0.1]" in log
    )
    assert "dry-run: not sent: " in log


def test_a_rejecting_filter_in_dry_run_lets_the_mail_through(start_dry: Start) -> None:
    milter, postfix = start_dry("tests.integration.ops_filters:Verdicts")
    recipients = ["reject@example.com", "bob@example.com"]
    send(postfix, message("hello"), recipients, sender="spam@example.net")
    [delivered] = postfix.wait_for_delivery(1)
    assert sorted(delivered.recipients) == sorted(recipients)
    assert delivered.message["Subject"] == "hello"
    assert "X-Rcpt-Count" not in delivered.message

    milter.stop()
    log = milter.log()
    assert re.search(
        r"stage=on_rcpt( client=\S+)?: dry-run: would answer REJECT at rcpt with reply "
        r"'550 5\.7\.1 no such user here'; sent CONTINUE\n", log
    ), log
    assert re.search(
        rf"queue_id={delivered.queue_id} stage=on_eom( client=\S+)?: "
        r"dry-run: would answer REJECT at eom; sent CONTINUE\n", log
    )
