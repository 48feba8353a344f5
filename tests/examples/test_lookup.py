"""examples.lookup: async recipient checks against a policy service, in the harness.

A policy service (`serve_policy`) runs on 127.0.0.1 in a thread of the test; the filter's
shared client is made in `on_worker_start`, which the harness runs before the first session.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import ClassVar

import pytest

from examples.lookup import LookupConfig, PolicyLookup, policy_service
from pymilterkit import Status
from pymilterkit.testing import Harness, HeaderAdded

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def service() -> Iterator[int]:
    with policy_service(0.0) as port:
        yield port


@pytest.fixture
def slow_service() -> Iterator[int]:
    with policy_service(2.0) as port:
        yield port


def lookup_on(port: int, timeout: float = 5.0) -> type[PolicyLookup]:
    class Local(PolicyLookup):
        config: ClassVar[LookupConfig] = LookupConfig(port=port, timeout=timeout)

    return Local


def test_recipients_are_checked_and_counted(service: int) -> None:
    with Harness(lookup_on(service), reraise=True) as harness:
        result = harness.run(MESSAGE, recipients=["bob@example.com", "bad@example.com",
                                                  "carol@example.org"])
        second = harness.run(MESSAGE, recipients=["dave@example.com"])
    assert [r.status for r in result.recipients] == [Status.CONTINUE, Status.REJECT,
                                                     Status.CONTINUE]
    reply = result.recipients[1].reply
    assert reply is not None and (reply.code, reply.xcode) == ("550", "5.7.1")
    assert reply.lines == ("no such mailbox",)
    assert result.modifications == (HeaderAdded("X-Policy-Checked", "2"),)
    assert second.modifications == (HeaderAdded("X-Policy-Checked", "1"),)


def test_a_slow_service_costs_a_tempfail_not_the_message(slow_service: int) -> None:
    with Harness(lookup_on(slow_service, timeout=0.2), reraise=True) as harness:
        result = harness.run(MESSAGE, recipients=["bob@example.com"])
    assert result.recipients[0].status is Status.TEMPFAIL
    reply = result.recipients[0].reply
    assert reply is not None and reply.code == "451"


def test_no_service_is_a_tempfail() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with Harness(lookup_on(port), reraise=True) as harness:
        result = harness.run(MESSAGE, recipients=["bob@example.com"])
    assert result.recipients[0].status is Status.TEMPFAIL
