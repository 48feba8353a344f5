"""examples/tagger.py: X-Tag and Subject prefix from header rules."""

from __future__ import annotations

from examples.tagger import Tagger
from pymilterkit import Status
from pymilterkit.testing import HeaderAdded, HeaderChanged, HeaderDeleted, apply_modifications
from pymilterkit.testing.pytest_plugin import HarnessFactory


def message(subject: bytes, sender: bytes = b"Alice <alice@example.org>",
            extra: bytes = b"") -> bytes:
    return (b"From: " + sender + b"\r\nTo: bob@example.com\r\nSubject: " + subject + b"\r\n"
            + extra + b"\r\nBody\r\n")


def test_finance_subject_is_tagged_without_prefix(milter_harness: HarnessFactory) -> None:
    msg = message(b"Your invoice for May")
    result = milter_harness(Tagger).run(msg)
    assert result.status is Status.CONTINUE
    assert result.modifications == (HeaderAdded("X-Tag", "finance"),)
    assert apply_modifications(msg, result) == (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\n"
        b"Subject: Your invoice for May\r\nX-Tag: finance\r\n\r\nBody\r\n"
    )


def test_several_rules_tag_in_rule_order_and_prefix_the_subject(
    milter_harness: HarnessFactory,
) -> None:
    msg = message(b"URGENT: payment overdue", b"Partner <billing@partner.example.net>")
    result = milter_harness(Tagger).run(msg)
    assert result.modifications == (
        HeaderAdded("X-Tag", "finance, partner, urgent"),
        HeaderChanged("Subject", 1, "[URGENT] URGENT: payment overdue"),
    )


def test_prefix_is_not_added_twice(milter_harness: HarnessFactory) -> None:
    result = milter_harness(Tagger).run(message(b"[URGENT] urgent reply needed"))
    assert result.modifications == (HeaderAdded("X-Tag", "urgent"),)


def test_encoded_and_folded_subject_is_matched_decoded_and_prefixed_raw(
    milter_harness: HarnessFactory,
) -> None:
    # "Dringend: urgent Überweisung" as RFC 2047 encoded words, folded over two lines.
    subject = b"=?utf-8?q?Dringend=3A_urgent?=\r\n =?utf-8?q?_=C3=9Cberweisung?="
    msg = message(subject)
    result = milter_harness(Tagger).run(msg)
    assert result.headers_added == (HeaderAdded("X-Tag", "urgent"),)
    [change] = result.headers_changed
    assert change.value == "[URGENT] =?utf-8?q?Dringend=3A_urgent?= =?utf-8?q?_=C3=9Cberweisung?="
    assert "\n" not in change.value


def test_incoming_tags_are_removed_last_first(milter_harness: HarnessFactory) -> None:
    msg = message(b"hello", extra=b"X-Tag: finance\r\nx-tag: vip\r\n")
    result = milter_harness(Tagger).run(msg)
    assert result.modifications == (HeaderDeleted("X-Tag", 2), HeaderDeleted("X-Tag", 1))
    assert b"X-Tag" not in apply_modifications(msg, result)
    assert b"x-tag" not in apply_modifications(msg, result)

    spoofed = milter_harness(Tagger).run(message(b"invoice", extra=b"X-Tag: vip\r\n"))
    assert spoofed.modifications == (HeaderDeleted("X-Tag", 1), HeaderAdded("X-Tag", "finance"))


def test_untagged_message_is_not_changed(milter_harness: HarnessFactory) -> None:
    result = milter_harness(Tagger).run(message(b"Lunch?"))
    assert result.status is Status.CONTINUE
    assert result.modifications == ()


def test_headers_are_per_message(milter_harness: HarnessFactory) -> None:
    conn = milter_harness(Tagger).run_connection([message(b"invoice"), message(b"lunch")])
    assert [m.modifications for m in conn.messages] == [(HeaderAdded("X-Tag", "finance"),), ()]


def test_custom_rules_by_subclassing(milter_harness: HarnessFactory) -> None:
    import re

    from examples.tagger import Rule

    class Vip(Tagger):
        rules = (Rule("From", re.compile(r"(?i)ceo@"), "vip", subject_prefix="VIP"),)

    result = milter_harness(Vip).run(message(b"invoice", b"ceo@example.org"))
    assert result.modifications == (
        HeaderAdded("X-Tag", "vip"),
        HeaderChanged("Subject", 1, "[VIP] invoice"),
    )
