"""`--dry-run` behind a real Postfix: the mail arrives as it was sent; the milter's log says
what the filter would have done, under Postfix's queue id."""

from __future__ import annotations

import re

from .mta import Start, message

DRY_RUN = ["--dry-run"]


def test_routing_in_dry_run_changes_nothing_and_logs_every_change(start: Start) -> None:
    setup = start("examples.mixins:AuditedRouting", args=DRY_RUN)
    milter, postfix = setup.milter, setup.postfix
    recipients = ["sales@example.com", "noreply@example.org", "bob@example.com"]
    sent = message("order")
    assert setup.send(sent, recipients, sender="carol@legacy.example.net") == {}
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


def test_a_rejecting_filter_in_dry_run_lets_the_mail_through(start: Start) -> None:
    setup = start("tests.integration.ops_filters:Verdicts", args=DRY_RUN)
    milter, postfix = setup.milter, setup.postfix
    recipients = ["reject@example.com", "bob@example.com"]
    assert setup.send(message("hello"), recipients, sender="spam@example.net") == {}
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
