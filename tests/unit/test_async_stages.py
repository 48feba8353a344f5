"""`async def` stage methods and the per-process hooks, through the in-process harness.

The harness runs the runner's own dispatch (`SessionRules`), awaiting coroutines on its loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    MilterSession,
    StageResultError,
    Status,
    noreply,
)
from pymilterkit.testing import Harness, HeaderAdded

MESSAGE = b"Subject: hi\r\nX-A: 1\r\n\r\nbody\r\n"


class Lookup(MilterSession):
    actions = Actions.ADD_HEADER
    calls: list[str] = []
    clients = 0

    @classmethod
    @override
    async def on_worker_start(cls) -> None:
        await asyncio.sleep(0)
        cls.clients += 1

    @classmethod
    @override
    def on_worker_stop(cls) -> None:
        cls.clients -= 1

    def __init__(self) -> None:
        self.accepted: list[str] = []

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        await asyncio.sleep(0.001)
        if "bad" in recipient:
            self.set_reply("550", "5.1.1", "unknown user")
            return Status.REJECT
        self.accepted.append(recipient)
        return Status.CONTINUE

    @override
    @noreply
    async def on_header(self, name: str, value: str) -> Status:
        type(self).calls.append(name)
        return Status.CONTINUE

    @override
    def on_eoh(self) -> Status:  # sync, between async ones
        type(self).calls.append("eoh")
        return Status.CONTINUE

    @override
    async def on_eom(self) -> Status:
        await asyncio.sleep(0)
        self.add_header("X-Accepted", str(len(self.accepted)))
        self.add_header("X-Clients", str(self.clients))
        return Status.CONTINUE

    @override
    async def on_abort(self) -> None:
        type(self).calls.append("abort")

    @override
    async def on_close(self) -> None:
        await asyncio.sleep(0)
        type(self).calls.append("close")


def test_async_stages_answer_like_sync_ones() -> None:
    Lookup.calls = []
    with Harness(Lookup, reraise=True) as harness:
        result = harness.run(MESSAGE, recipients=["a@x", "bad@y", "c@z"])
    assert [r.status for r in result.recipients] == [Status.CONTINUE, Status.REJECT,
                                                     Status.CONTINUE]
    bad = result.recipients[1].reply
    assert bad is not None and bad.code == "550" and bad.lines == ("unknown user",)
    assert result.modifications == (HeaderAdded("X-Accepted", "2"), HeaderAdded("X-Clients", "1"))
    assert Lookup.calls == ["Subject", "X-A", "eoh", "close"]
    assert Lookup.clients == 0  # on_worker_stop ran at close


def test_negotiation_of_async_stages_is_the_same() -> None:
    spec = Lookup.negotiation()
    assert spec.asynchronous == {"on_rcpt", "on_header", "on_eom", "on_abort", "on_close"}
    assert "on_header" in spec.noreply
    assert "on_eoh" in spec.stages and "on_eoh" not in spec.asynchronous


def test_mixins_mix_sync_and_async() -> None:
    class AsyncRcpt(MilterSession):
        @override
        async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
            return Status.TEMPFAIL

    class SyncEom(MilterSession):
        actions = Actions.ADD_HEADER

        @override
        def on_eom(self) -> Status:
            self.add_header("X-Sync", "yes")
            return Status.CONTINUE

    class Both(AsyncRcpt, SyncEom):
        pass

    result = Harness(Both, reraise=True).run(MESSAGE, recipients=["a@x", "b@y"])
    assert [r.status for r in result.recipients] == [Status.TEMPFAIL, Status.TEMPFAIL]


def test_an_async_exception_follows_the_error_policy(caplog: pytest.LogCaptureFixture) -> None:
    class Fails(MilterSession):
        @override
        async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
            await asyncio.sleep(0)
            raise asyncio.CancelledError  # a stray one: an error of this stage, not fatal

    result = Harness(Fails).run(MESSAGE, recipients=["a@x"])
    assert result.recipients[0].status is Status.TEMPFAIL
    assert "on_rcpt raised CancelledError; answering TEMPFAIL" in caplog.text
    with pytest.raises(asyncio.CancelledError):
        Harness(Fails, reraise=True).run(MESSAGE, recipients=["a@x"])


def _hides_async(
    method: Callable[..., Coroutine[Any, Any, Status]],
) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any) -> Any:
        return method(*args)  # a sync wrapper returning the coroutine

    return wrapper


class DeclaredSync(MilterSession):
    async def _lookup(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE

    on_rcpt = _hides_async(_lookup)


def test_a_coroutine_from_a_sync_method_fails_loudly_with_reraise() -> None:
    with pytest.raises(StageResultError, match="async def"):
        Harness(DeclaredSync, reraise=True).run(MESSAGE, recipients=["a@x"])


def test_a_coroutine_from_a_sync_method_is_an_error_status_and_never_run(
    recwarn: pytest.WarningsRecorder,
) -> None:
    result = Harness(DeclaredSync).run(MESSAGE, recipients=["a@x"])
    assert result.recipients[0].status is Status.TEMPFAIL
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_wrong_async_result_fails_loudly_with_reraise() -> None:
    class Wrong(MilterSession):
        @override
        async def on_eom(self) -> Status:
            return "yes"  # type: ignore[return-value]

    with pytest.raises(StageResultError):
        Harness(Wrong, reraise=True).run(MESSAGE)
    assert Harness(Wrong).run(MESSAGE).status is Status.TEMPFAIL


def test_negotiate_cannot_be_async() -> None:
    with pytest.raises(TypeError, match="on_negotiate cannot be async"):

        class Bad(MilterSession):
            async def on_negotiate(self, actions: Any, opts: Any) -> Any:  # type: ignore[override]
                return None


def test_milter_harness_fixture_closes_harnesses(milter_harness: Any) -> None:
    harness = milter_harness(Lookup)
    harness.run(MESSAGE, recipients=["a@x"])
    assert Lookup.clients == 1  # started; the fixture's teardown runs on_worker_stop
