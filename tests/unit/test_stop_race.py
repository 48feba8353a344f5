"""A stop (`LibmilterCallbacks.close_all`) against callbacks caught mid-way.

A stage callback marks its thread with its context, looks its session up, then marks its stage;
a stop between the look-up and the stage mark must not close the session under it. Each test
holds a callback thread inside that window (its session look-up blocks on an event), runs the
stop, then lets the callback go on, and checks the filter's own record: on_close is the last
call, once, and nothing runs after it. Without libmilter: the callbacks are the runner's own
(`stage_callback`), keyed by a made-up context.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status, _metrics, _trampolines
from pymilterkit._dispatch import keys_inside
from pymilterkit._loop import EventLoopThread
from pymilterkit._trampolines import LibmilterCallbacks, _envelope

CTX = 0x5EED


class Record(MilterSession):
    """Records its calls, with the thread that made each."""

    calls: list[str] = []
    in_close = threading.Event()
    close_may_end = threading.Event()

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.calls.append(f"rcpt {recipient}")
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self.calls.append("abort")

    @override
    def on_close(self) -> None:
        self.calls.append("close")
        Record.in_close.set()
        Record.close_may_end.wait(10)


class AsyncRecord(Record):
    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:  # type: ignore[override]
        self.calls.append(f"rcpt {recipient}")
        return Status.CONTINUE


class Callbacks(LibmilterCallbacks):
    """No libmilter context to read: an async stage is awaited on the callback's thread."""

    def _can_defer(self, ctx: int, stage: str) -> bool:
        return False


class NoContext:
    """A session's backend with no libmilter context behind it (logs read no macro)."""

    def getsymval(self, name: bytes) -> None:
        return None


@pytest.fixture(autouse=True)
def _reset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    Record.calls = []
    Record.in_close = threading.Event()
    Record.close_may_end = threading.Event()
    Record.close_may_end.set()
    # The callbacks run on Python's threads here, not libmilter's: nothing to pin.
    monkeypatch.setattr(_trampolines, "pin_thread_state", lambda: None)
    yield


def _dispatcher(session_class: type[MilterSession]) -> tuple[Callbacks, EventLoopThread | None]:
    loop = EventLoopThread() if session_class.negotiation().asynchronous else None
    dispatcher = Callbacks(session_class, None, Status.TEMPFAIL, lambda exc: None, loop=loop)  # type: ignore[arg-type]
    session = dispatcher.create(NoContext())  # type: ignore[arg-type]
    dispatcher.sessions[CTX] = session
    return dispatcher, loop


class HeldLookup(dict[int, MilterSession]):
    """The dispatcher's sessions, whose look-up, once, stops after finding one until released."""

    def __init__(self, dispatcher: Callbacks) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.found, self.release = threading.Event(), threading.Event()

    def __getitem__(self, key: int) -> MilterSession:
        session = self.dispatcher.sessions[key]
        if not self.found.is_set():
            self.found.set()
            self.release.wait(10)
        return session


def _start(function: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize(
    ("session_class", "metered"),
    [(Record, False), (AsyncRecord, False), (Record, True)],
    ids=["sync", "async", "sync-metered"],
)
def test_a_stop_waits_for_a_callback_between_its_lookup_and_its_stage(
    session_class: type[MilterSession], metered: bool
) -> None:
    dispatcher, loop = _dispatcher(session_class)
    try:
        held = HeldLookup(dispatcher)
        found, release = held.found, held.release
        if metered:  # metrics' wrapper around the same callback
            shared = _metrics.SharedCounts(rows=1)
            dispatcher.meter = _metrics.Meter(_metrics.Recorder(shared, 0))
        callback = dispatcher.stage_callback(
            "on_rcpt", held, dispatcher._create, _envelope, envelope=True
        )
        stage, answer = _start(lambda: callback(CTX, (b"<a@b>", None)))
        assert found.wait(10)
        assert keys_inside() == {CTX}  # marked before the look-up
        stop, closed = _start(lambda: dispatcher.close_all(grace=10))
        time.sleep(0.2)  # the stop looks at the session meanwhile (not a timed assertion)
        release.set()
        stage.join(10)
        stop.join(10)
        assert Record.calls == ["rcpt <a@b>", "abort", "close"]  # a message was open
        assert answer == [Status.CONTINUE] and closed == [1]
        assert dispatcher.sessions == {} and dispatcher._closing == {}
        assert keys_inside() == set()
        if metered:
            rcpt = _metrics.snapshot(shared)["stages"]["on_rcpt"]
            assert rcpt["results"]["continue"] == 1
            shared.close()
    finally:
        if loop is not None:
            loop.stop()


@pytest.mark.parametrize("session_class", [Record, AsyncRecord], ids=["sync", "async"])
def test_a_callback_after_the_stop_took_the_session_makes_none(
    session_class: type[MilterSession],
) -> None:
    dispatcher, loop = _dispatcher(session_class)
    try:
        assert dispatcher.close_all(grace=1) == 1
        callback = dispatcher.stage_callback(
            "on_rcpt", dispatcher.sessions, dispatcher._create, _envelope, envelope=True
        )
        assert callback(CTX, (b"<late@b>", None)) == Status.TEMPFAIL
        assert dispatcher._negotiate(CTX, 0, 0, 0, 0, None, None, None, None) == Status.TEMPFAIL
        assert dispatcher._abort(CTX) == Status.CONTINUE
        assert dispatcher._close(CTX) == Status.CONTINUE
        assert Record.calls == ["close"]
        assert dispatcher.sessions == {} and dispatcher.created == 1
    finally:
        if loop is not None:
            loop.stop()


def test_a_stop_waits_for_an_abort_that_began_before_it() -> None:
    dispatcher, _ = _dispatcher(Record)
    dispatcher.sessions[CTX]._pmk_in_message = True  # so that on_abort runs
    looked_up, release = threading.Event(), threading.Event()
    sessions = dispatcher.sessions

    class HeldDict(dict[int, MilterSession]):
        def get(self, key: int, default: Any = None) -> Any:
            session = super().get(key, default)
            looked_up.set()
            release.wait(10)
            return session

    def abort() -> None:
        dispatcher._abort(CTX)
        Record.calls.append("abort callback returned")

    dispatcher.sessions = HeldDict(sessions)
    aborted, _ = _start(abort)
    assert looked_up.wait(10)
    stop, _ = _start(lambda: dispatcher.close_all(grace=10))
    time.sleep(0.2)
    release.set()
    aborted.join(10)
    stop.join(10)
    assert Record.calls == ["abort", "abort callback returned", "close"]


def test_libmilters_close_of_a_session_the_stop_is_closing_waits_for_its_on_close() -> None:
    # libmilter frees the context once xxfi_close returns: on_close (which may read macros)
    # must be over by then.
    dispatcher, _ = _dispatcher(Record)
    Record.close_may_end.clear()
    stop, _ = _start(lambda: dispatcher.close_all(grace=10))
    assert Record.in_close.wait(10)
    closed, answer = _start(lambda: dispatcher._close(CTX))
    closed.join(0.3)
    assert closed.is_alive()  # still waiting for the stop's on_close
    Record.close_may_end.set()
    closed.join(10)
    stop.join(10)
    assert answer == [Status.CONTINUE] and Record.calls == ["close"]
