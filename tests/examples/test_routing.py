"""examples/routing.py: archive copies, dropped no-reply recipients, sender rewriting."""

from __future__ import annotations

from examples.routing import Routing
from pymilterkit import Status
from pymilterkit.testing import (
    Envelope,
    RecipientAdded,
    RecipientRemoved,
    SenderChanged,
    apply_envelope,
)
from pymilterkit.testing.pytest_plugin import HarnessFactory

MESSAGE = b"From: a@example.net\r\nSubject: order\r\n\r\nplease\r\n"


def test_sales_gets_an_archive_copy(milter_harness: HarnessFactory) -> None:
    result = milter_harness(Routing).run(
        MESSAGE, recipients=["Sales@Example.com", "bob@example.com"]
    )
    assert result.status is Status.CONTINUE
    assert result.modifications == (RecipientAdded("<archive@example.com>", None),)


def test_archive_is_not_added_when_already_a_recipient(milter_harness: HarnessFactory) -> None:
    result = milter_harness(Routing).run(
        MESSAGE, recipients=["sales@example.com", "archive@example.com"]
    )
    assert result.modifications == ()


def test_noreply_recipients_are_removed_as_given(milter_harness: HarnessFactory) -> None:
    envelope = Envelope.of("a@example.net", ["bob@example.com", "NoReply@example.com",
                                             "no-reply@example.org"])
    result = milter_harness(Routing).run(MESSAGE, envelope=envelope)
    assert result.modifications == (
        RecipientRemoved("<NoReply@example.com>"),
        RecipientRemoved("<no-reply@example.org>"),
    )
    assert [r.address for r in apply_envelope(envelope, result).recipients] == [
        "bob@example.com"
    ]


def test_message_only_for_noreply_is_discarded(milter_harness: HarnessFactory) -> None:
    result = milter_harness(Routing).run(MESSAGE, recipients=["noreply@example.com"])
    assert result.status is Status.DISCARD
    assert result.modifications == ()


def test_legacy_sender_is_rewritten_keeping_ret_and_envid(milter_harness: HarnessFactory) -> None:
    result = milter_harness(Routing).run(
        MESSAGE,
        sender="Alice@Legacy.Example.NET",
        sender_params="SIZE=100 RET=HDRS ENVID=q42 BODY=8BITMIME",
        recipients=["bob@example.com"],
    )
    assert result.modifications == (SenderChanged("<alice@example.com>", "RET=HDRS ENVID=q42"),)


def test_other_senders_and_null_sender_are_kept(milter_harness: HarnessFactory) -> None:
    for sender in ("alice@example.net", "", "alice@sub.legacy.example.net"):
        result = milter_harness(Routing).run(MESSAGE, sender=sender,
                                             recipients=["bob@example.com"])
        assert result.modifications == (), sender


def test_all_three_at_once_and_per_message(milter_harness: HarnessFactory) -> None:
    first = Envelope.of("carol@legacy.example.net", ["sales@example.com", "noreply@example.com"])
    second = Envelope.of("dave@example.net", ["bob@example.com"])
    conn = milter_harness(Routing).run_connection([(first, MESSAGE), (second, MESSAGE)])
    assert conn.messages[0].modifications == (
        RecipientRemoved("<noreply@example.com>"),
        RecipientAdded("<archive@example.com>", None),
        SenderChanged("<carol@example.com>", None),
    )
    after = apply_envelope(first, conn.messages[0])
    assert after.sender == "carol@example.com"
    assert sorted(r.address for r in after.recipients) == [
        "archive@example.com", "sales@example.com"
    ]
    assert conn.messages[1].modifications == ()
