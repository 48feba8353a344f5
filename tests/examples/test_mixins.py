"""examples/mixins.py: one AuditMixin reused by two filters."""

from __future__ import annotations

from examples.mixins import AuditedRouting, AuditedTagger
from examples.routing import Routing
from examples.tagger import Tagger
from pymilterkit import Actions, Stage, Status
from pymilterkit.testing import (
    ClientInfo,
    Envelope,
    HeaderAdded,
    RecipientAdded,
    apply_modifications,
)
from pymilterkit.testing.pytest_plugin import HarnessFactory, ProcessFactory

MESSAGE = b"From: a@example.net\r\nSubject: invoice 42\r\n\r\nhi\r\n"
CLIENT = ClientInfo(hostname="mail.example.net", macros={"connect": {"j": "mx.example.org"}})


def test_the_mixin_brings_its_own_configuration() -> None:
    assert AuditedTagger.negotiation().actions == (
        Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.SETSYMLIST)
    assert Actions.ADD_HEADER not in Routing.negotiation().actions
    assert AuditedRouting.negotiation().actions == (
        Routing.negotiation().actions | Actions.ADD_HEADER | Actions.SETSYMLIST)
    assert AuditedRouting.negotiation().macros == {Stage.CONNECT: ("j",), Stage.EOM: ("i",)}
    # The mixin's on_connect brings the connect stage to filters that had none.
    assert "on_connect" not in Tagger.negotiation().stages
    assert "on_connect" in AuditedTagger.negotiation().stages


def test_audited_tagger(milter_harness: HarnessFactory) -> None:
    envelope = Envelope.of("a@example.net", ["bob@example.com"], queue_id="4XyZ1")
    conn = milter_harness(AuditedTagger).run_connection([(envelope, MESSAGE)], client=CLIENT)
    [result] = conn.messages
    assert conn.negotiation.macros == {Stage.CONNECT: ("j",), Stage.EOM: ("i",)}
    assert result.modifications == (
        HeaderAdded("X-Tag", "finance"),
        HeaderAdded("X-Audit", "AuditedTagger on mx.example.org queue-id=4XyZ1; "
                               "client=mail.example.net [192.0.2.10]"),
    )
    assert apply_modifications(MESSAGE, result).endswith(
        b"X-Tag: finance\r\nX-Audit: AuditedTagger on mx.example.org queue-id=4XyZ1; "
        b"client=mail.example.net [192.0.2.10]\r\n\r\nhi\r\n")


def test_audited_routing(milter_harness: HarnessFactory) -> None:
    envelope = Envelope.of("a@example.net", ["sales@example.com"], queue_id="QID7")
    [result] = milter_harness(AuditedRouting).run_connection(
        [(envelope, MESSAGE)], client=CLIENT).messages
    assert result.modifications == (
        RecipientAdded("<archive@example.com>", None),
        HeaderAdded("X-Audit", "AuditedRouting on mx.example.org queue-id=QID7; "
                               "client=mail.example.net [192.0.2.10]"),
    )


def test_no_audit_when_the_filter_discards(milter_harness: HarnessFactory) -> None:
    result = milter_harness(AuditedRouting).run(MESSAGE, recipients=["noreply@example.com"],
                                                client=CLIENT)
    assert result.status is Status.DISCARD
    assert result.modifications == ()


def test_the_filters_alone_are_unchanged(milter_harness: HarnessFactory) -> None:
    assert milter_harness(Tagger).run(MESSAGE).modifications == (
        HeaderAdded("X-Tag", "finance"),)


def test_audited_tagger_behind_the_real_libmilter(milter_process: ProcessFactory) -> None:
    client = milter_process(AuditedTagger)
    result = client.run(MESSAGE, recipients=["bob@example.com"])
    audit = result.header("X-Audit")
    assert audit is not None and audit.startswith("AuditedTagger on ")
    assert result.header("X-Tag") == "finance"
