"""`--dry-run` over the wire: the MTA gets CONTINUE and nothing else; the log tells the rest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pymilterkit import Actions, Status
from pymilterkit.testing import Envelope, MilterClient, MilterProcess

from .test_metrics import MESSAGE, TARGET, endpoint, settled, value, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_dry_run_sends_continue_and_no_modification_and_logs_what_it_would_do() -> None:
    args = ["--dry-run", "--metrics", "127.0.0.1:0"]
    with MilterProcess(TARGET, args=args, cwd=ROOT) as milter:
        address = endpoint(milter)
        client = MilterClient(milter.socket)
        conn = client.run_connection(
            [
                (Envelope.of("a@example.net", ["ok@example.org", "reject@example.org",
                                                   "boom@example.org"]), MESSAGE),
                (Envelope.of("spam@example.net", ["ok@example.org"]), MESSAGE),
            ]
        )
        # Asked for no actions: only the macro list (SETSYMLIST), which changes nothing.
        assert conn.negotiation.actions == Actions.SETSYMLIST
        for result in conn.messages:
            assert result.status == Status.CONTINUE
            assert result.modifications == ()
            assert result.reply is None
            assert all(r.status == Status.CONTINUE for r in result.recipients)

        def logged() -> bool:
            return "dry-run: would answer REJECT at eom" in milter.log()

        wait_until(logged, "the eom verdict in the log")
        log = milter.log()
        assert re.search(
            r"queue_id=\w+ stage=on_rcpt client=[\d.]+: "
            r"dry-run: would set_reply 550 5\.7\.1 no such user here\n", log
        )
        assert (
            "dry-run: would answer REJECT at rcpt with reply '550 5.7.1 no such user here'; "
            "sent CONTINUE" in log
        )
        # The error status after an exception is a verdict like any other.
        assert "Verdicts.on_rcpt raised RuntimeError; answering TEMPFAIL" in log
        assert "dry-run: would answer TEMPFAIL at rcpt" in log
        assert log.count("dry-run: would add_header X-Rcpt-Count: 1") == 2
        assert "dry-run: would change_header Subject #1: [checked]" in log

        samples = settled(address, 1)
        dry = "pymilterkit_dry_run_verdicts_total"
        assert value(samples, dry, stage="rcpt", status="reject") == 1
        assert value(samples, dry, stage="rcpt", status="tempfail") == 1
        assert value(samples, dry, stage="eom", status="reject") == 1
        assert value(samples, "pymilterkit_dry_run_actions_total", action="add_header") == 6
        assert value(samples, "pymilterkit_dry_run_actions_total", action="set_reply") == 1
        # What the MTA got: CONTINUE everywhere, no action.
        assert value(samples, "pymilterkit_stage_results_total", stage="rcpt",
                     status="continue") == 4
        assert value(samples, "pymilterkit_stage_results_total", stage="rcpt",
                     status="reject") == 0
        assert value(samples, "pymilterkit_actions_total", action="add_header") == 0
        assert value(samples, "pymilterkit_stage_errors_total", stage="rcpt") == 1
        assert milter.stop() == 0
        assert (
            "dry-run: not sent: REJECT at eom x1, REJECT at rcpt x1, TEMPFAIL at rcpt x1, "
            "add_header x6, change_header x2, set_reply x1" in milter.log()
        )


def test_dry_run_validates_actions_exactly_as_usual() -> None:
    with MilterProcess(TARGET, args=["--dry-run"], cwd=ROOT) as milter:
        client = MilterClient(milter.socket)
        for sender in ("invalid@example.net", "undeclared@example.net"):
            result = client.run(MESSAGE, sender=sender)
            assert result.status == Status.CONTINUE
            assert result.modifications == ()
        wait_until(lambda: milter.log().count("would answer TEMPFAIL at eom") == 2, "2 verdicts")
        log = milter.log()
        assert "Verdicts.on_eom raised InvalidArgumentError; answering TEMPFAIL" in log
        assert "Verdicts.on_eom raised UndeclaredActionError; answering TEMPFAIL" in log
        assert "would add_header Bad Name" not in log
        assert "would quarantine" not in log


def test_without_dry_run_the_same_conversation_is_acted_on() -> None:
    """The reference: the same filter and messages, answered and modified for real."""
    with MilterProcess(TARGET, cwd=ROOT) as milter:
        client = MilterClient(milter.socket)
        conn = client.run_connection(
            [(Envelope.of("spam@example.net", ["ok@example.org", "reject@example.org"]),
              MESSAGE)]
        )
        assert conn.negotiation.actions == (
            Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.SETSYMLIST
        )
        [result] = conn.messages
        assert result.status == Status.REJECT
        assert [r.status for r in result.recipients] == [Status.CONTINUE, Status.REJECT]
        assert result.modifications != ()
        assert "dry-run" not in milter.log()
