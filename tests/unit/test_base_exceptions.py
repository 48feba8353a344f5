"""Only KeyboardInterrupt and SystemExit stop the milter; other BaseExceptions are stage errors.

The harness uses the runner's error policy (`SessionRules.fail`), so what holds here holds on
libmilter too (tests/integration/test_hostile_macros.py checks that over the wire).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status
from pymilterkit.testing import Envelope, Harness, Step

MESSAGE = b"From: a@example.net\r\nTo: b@example.org\r\n\r\nbody\r\n"


class Custom(BaseException):
    """A BaseException that is neither an Exception nor one of the fatal two."""


class RaisesInRcpt(MilterSession):
    """Raises `exc` (chosen by the recipient's local part) in on_rcpt; good recipients pass."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = recipient.strip("<>").split("@")[0]
        if local == "cancelled":
            raise asyncio.CancelledError()
        if local == "genexit":
            raise GeneratorExit()
        if local == "custom":
            raise Custom("custom")
        if local == "interrupt":
            raise KeyboardInterrupt()
        if local == "exit":
            raise SystemExit(3)
        return Status.CONTINUE


def _cancelled_task() -> None:
    """The common pattern: asyncio.run of a task that gets cancelled."""

    async def main() -> None:
        task = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        await task

    asyncio.run(main())


class CancelledByAsyncio(MilterSession):
    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        _cancelled_task()
        return Status.CONTINUE


@pytest.mark.parametrize(
    ("local", "kind"),
    [("cancelled", asyncio.CancelledError), ("genexit", GeneratorExit), ("custom", Custom)],
)
def test_non_fatal_base_exception_is_answered_with_error_status(
    local: str, kind: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="pymilterkit"):
        envelope = Envelope.of(recipients=[f"{local}@x", "good@x"])
        conn = Harness(RaisesInRcpt).run_connection([(envelope, MESSAGE), (envelope, MESSAGE)])
    for msg in conn.messages:
        rcpt = [a.status for a in msg.answers if a.step is Step.RCPT]
        assert rcpt == [Status.TEMPFAIL, Status.CONTINUE]
        assert msg.status is Status.CONTINUE  # the good recipient carries the message on
    assert [(stage, type(exc)) for stage, exc in conn.errors] == [("on_rcpt", kind)] * 2
    assert f"RaisesInRcpt.on_rcpt raised {kind.__name__}; answering TEMPFAIL" in caplog.text
    assert "Traceback" in caplog.text  # logged with its traceback
    assert "stopping the milter" not in caplog.text


def test_error_status_applies_to_base_exceptions() -> None:
    result = Harness(RaisesInRcpt, error_status=Status.REJECT).run(
        MESSAGE, recipients=["custom@x"]
    )
    assert [a.status for a in result.answers if a.step is Step.RCPT] == [Status.REJECT]


def test_cancelled_task_inside_asyncio_run_is_a_stage_error() -> None:
    conn = Harness(CancelledByAsyncio).run_connection([MESSAGE, MESSAGE])
    assert [m.status for m in conn.messages] == [Status.TEMPFAIL] * 2
    assert [type(exc) for _, exc in conn.errors] == [asyncio.CancelledError] * 2


@pytest.mark.parametrize(
    ("local", "kind"), [("interrupt", KeyboardInterrupt), ("exit", SystemExit)]
)
def test_keyboard_interrupt_and_system_exit_still_stop(
    local: str, kind: type[BaseException]
) -> None:
    with pytest.raises(kind):
        Harness(RaisesInRcpt).run(MESSAGE, recipients=[f"{local}@x"])
