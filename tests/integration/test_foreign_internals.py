"""The fallbacks of what relies on foreign internals, on the real libmilter.

`_libmilter_private` trusts `struct smfi_str` only after a check on a live context, and `_loop`
uses asyncio's loop internals only when they are there. Here each check is made to fail (the
filter moves the offset the layout check looks at; the asyncio check is told a name is
missing), and the milter must still answer everything right, and say once per process, at
WARNING, what fell back and why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pymilterkit import Status
from pymilterkit.testing import HeaderAdded, MilterClient, MilterProcess

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unknown_layout_falls_back_and_says_so_once_per_process(workers: str) -> None:
    with MilterProcess(
        "tests.integration.async_filters:OtherLayout", args=("--workers", workers), cwd=ROOT
    ) as milter:
        client = MilterClient(milter.socket, timeout=10)
        for _ in range(4):
            result = client.run(MESSAGE, recipients=["a@x", "bad@y"])
            assert [r.status for r in result.recipients] == [Status.CONTINUE, Status.REJECT]
            reply = result.recipients[1].reply  # set_reply's text: sent by libmilter itself
            assert reply is not None and (reply.code, reply.lines) == ("550", ("no such user",))
            assert result.modifications[0] == HeaderAdded("X-J", "mx.example.org")
        log = milter.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert warnings, log
    for line in warnings:
        assert "context layout is not the one pymilterkit knows" in line
        assert "libmilter_version() 1.0.1" in line
        assert "layout check: smfi_setpriv's pointer is not at offset 8 of the context" in line
        assert "late answers" in line and "bounded macro reads" in line
    assert len(warnings) <= int(workers)  # once per serving process that saw a connection


@pytest.mark.parametrize("workers", ["1", "2"])
def test_without_asyncios_internals_async_stages_still_answer_and_it_says_so(
    workers: str,
) -> None:
    env = {**os.environ, "PMK_FAKE_ASYNCIO": "1", "PMK_DELAY": "0.01"}
    with MilterProcess(
        "tests.integration.async_filters:PublicLoopRcpt", args=("--workers", workers),
        cwd=ROOT, env=env,
    ) as milter:
        client = MilterClient(milter.socket, timeout=10)
        for _ in range(4):
            result = client.run(MESSAGE, recipients=["a@x", "bad@y", "c@z"])
            assert [r.status for r in result.recipients] == [
                Status.CONTINUE, Status.REJECT, Status.CONTINUE
            ]
            reply = result.recipients[1].reply
            assert reply is not None and (reply.code, reply.lines) == ("550", ("no such user",))
            assert result.modifications[0] == HeaderAdded("X-Rcpts", "2")
        log = milter.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert 1 <= len(warnings) <= int(workers), log  # once per serving process
    for line in warnings:
        assert "asyncio internals differ" in line and "missing loop._ready (faked)" in line
