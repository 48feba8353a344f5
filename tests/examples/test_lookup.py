"""examples.lookup: async recipient checks against a policy service, in the harness.

A policy service (`serve_policy`) runs on 127.0.0.1 in a thread of the test; the filter's
shared client is made in `on_worker_start`, which the harness runs before the first session.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from examples.lookup import LookupConfig, PolicyLookup, serve_policy
from pymilterkit import Status
from pymilterkit.testing import Harness, HeaderAdded

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def _service(delay: float) -> Iterator[int]:
    loop = asyncio.new_event_loop()
    ready = asyncio.Event()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    task = loop.create_task(serve_policy("127.0.0.1", port, delay, ready))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(ready.wait(), loop).result(5)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(_stop_all(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        assert task.done()


async def _stop_all() -> None:
    """Cancel the service and its connections' handlers, and let their sockets close."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.fixture
def service() -> Iterator[int]:
    yield from _service(0.0)


@pytest.fixture
def slow_service() -> Iterator[int]:
    yield from _service(2.0)


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
