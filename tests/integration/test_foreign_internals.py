"""The fallbacks of what depends on libmilter's private layout, on the real libmilter.

`_libmilter_private` trusts `struct smfi_str` only after a check on a live context. Here the
check is made to fail (the filter moves the offset it looks at), and the milter must still
answer everything right, by the public API, and say once, at WARNING, what fell back and why.
"""

from __future__ import annotations

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
