"""How the runner answers an async stage (`LibmilterCallbacks.answer_async` on a real
`EventLoopThread`, no libmilter): a stage done in its first step is answered on the calling
thread; one that suspends is answered by its task's end. Either way the same error policy
holds: KeyboardInterrupt and SystemExit stop the milter, other exceptions are answered with
the error status, a wrong result is corrected."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status
from pymilterkit._dispatch import NO_PARAMS
from pymilterkit._loop import EventLoopThread
from pymilterkit._trampolines import LibmilterCallbacks


class Rcpt(MilterSession):
    """The recipient's local part says what on_rcpt does; `wait-` first awaits the loop."""

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = recipient.split("@")[0]
        if local.startswith("wait-"):
            await asyncio.sleep(0.01)  # a real wait: the loop's timer ends it
            local = local[5:]
        if local == "interrupt":
            raise KeyboardInterrupt
        if local == "exit":
            raise SystemExit(3)
        if local == "raise":
            raise RuntimeError("boom")
        if local == "cancel":
            raise asyncio.CancelledError("stray")
        if local == "reject":
            return Status.REJECT
        if local == "garbage":
            return "garbage"  # type: ignore[return-value]
        return Status.CONTINUE


@pytest.fixture
def runner() -> Iterator[tuple[LibmilterCallbacks, list[BaseException]]]:
    fatal: list[BaseException] = []
    loop = EventLoopThread()
    callbacks = LibmilterCallbacks(Rcpt, None, Status.TEMPFAIL, fatal.append, loop=loop)  # type: ignore[arg-type]
    callbacks._answer_later = False  # no libmilter: the calling thread waits for the answer
    try:
        yield callbacks, fatal
    finally:
        loop.stop()


def _answer(callbacks: LibmilterCallbacks, recipient: str) -> int:
    """The answer of on_rcpt(recipient), called on a thread of its own as libmilter calls it."""
    session = Rcpt()
    answers: list[int] = []

    def call() -> None:
        session._pmk_stage = "on_rcpt"
        coro = session.on_rcpt(recipient, NO_PARAMS)
        answers.append(callbacks.answer_async(0, session, "on_rcpt", coro))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(10)
    assert session._pmk_pending is None and session._pmk_stage is None
    return answers[0]


@pytest.mark.parametrize("wait", ["", "wait-"])
@pytest.mark.parametrize(
    ("local", "answer"),
    [("ok", Status.CONTINUE), ("reject", Status.REJECT), ("raise", Status.TEMPFAIL),
     ("cancel", Status.TEMPFAIL), ("garbage", Status.TEMPFAIL)],
)
def test_answers_and_errors_alike_whether_or_not_it_suspended(
    runner: tuple[LibmilterCallbacks, list[BaseException]], wait: str, local: str, answer: int
) -> None:
    callbacks, fatal = runner
    assert _answer(callbacks, f"{wait}{local}@example.org") == answer
    assert fatal == []


@pytest.mark.parametrize("wait", ["", "wait-"])
@pytest.mark.parametrize(
    ("local", "kind"), [("interrupt", KeyboardInterrupt), ("exit", SystemExit)]
)
def test_keyboard_interrupt_and_system_exit_stop_the_milter(
    runner: tuple[LibmilterCallbacks, list[BaseException]],
    wait: str,
    local: str,
    kind: type[BaseException],
) -> None:
    callbacks, fatal = runner
    assert _answer(callbacks, f"{wait}{local}@example.org") == Status.TEMPFAIL
    assert [type(exc) for exc in fatal] == [kind]
    assert callbacks.loop is not None and callbacks.loop.alive  # async stages still served
    assert _answer(callbacks, "wait-ok@example.org") == Status.CONTINUE


def test_suspended_stages_of_several_threads_are_each_answered_and_freed(
    runner: tuple[LibmilterCallbacks, list[BaseException]],
) -> None:
    callbacks, _ = runner
    answers: list[int] = []

    def one() -> None:
        answers.append(_answer(callbacks, "wait-ok@example.org"))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers == [Status.CONTINUE] * 8
