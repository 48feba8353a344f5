"""The event loop of `async def` stages: a coroutine's first step runs on the caller's thread."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from pymilterkit._loop import EventLoopThread


@pytest.fixture
def loop() -> Iterator[EventLoopThread]:
    thread = EventLoopThread()
    yield thread
    thread.stop()


def test_a_coroutine_that_does_not_suspend_is_done_on_the_callers_thread(
    loop: EventLoopThread,
) -> None:
    seen: list[object] = []

    async def quick() -> str:
        seen.append((threading.current_thread(), asyncio.current_task() is not None))
        return "done"

    task = loop.start(quick(), seen.append)
    assert task.done() and task.result() == "done"
    assert seen == [(threading.current_thread(), True)]  # the hook is for suspension only


def test_a_coroutine_that_suspends_goes_on_on_the_loop(loop: EventLoopThread) -> None:
    threads: list[threading.Thread] = []
    hooked: list[object] = []

    async def slow() -> int:
        threads.append(threading.current_thread())
        await asyncio.sleep(0.01)
        threads.append(threading.current_thread())
        return 7

    finished = threading.Event()

    def suspended(task: asyncio.Task[int]) -> None:
        hooked.append(task)
        task.add_done_callback(lambda _: finished.set())

    task = loop.start(slow(), suspended)
    assert hooked == [task] and not task.done()
    assert finished.wait(5) and task.result() == 7
    assert threads == [threading.current_thread(), loop.thread]
    assert loop.run(slow()) == 7  # run(): the same, waiting here


def test_what_a_quick_coroutine_schedules_still_runs(loop: EventLoopThread) -> None:
    fired = threading.Event()
    spawned = threading.Event()
    tasks: list[asyncio.Future[None]] = []

    async def background() -> None:
        spawned.set()

    async def quick() -> None:
        asyncio.get_running_loop().call_later(0.02, fired.set)
        tasks.append(asyncio.ensure_future(background()))

    assert loop.start(quick()).done()
    assert fired.wait(5) and spawned.wait(5)  # the loop was woken for them


def test_deadlines_of_quick_coroutines_do_not_pile_up(loop: EventLoopThread) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):  # a timer per call, cancelled at once
            pass

    for _ in range(2000):
        assert loop.start(bounded()).done()
    loop.run(asyncio.sleep(0.01))  # a turn of the loop drops the cancelled timers
    scheduled = loop.loop._scheduled  # type: ignore[attr-defined]
    assert len(scheduled) < 200


def test_a_stopped_loop_refuses_and_closes_the_coroutine() -> None:
    loop = EventLoopThread()
    loop.stop()

    async def never() -> None:
        raise AssertionError("ran")

    with pytest.raises(RuntimeError, match="not running"):
        loop.start(never())  # closed: no "never awaited" warning (warnings are errors)


def test_run_cancels_past_its_timeout(loop: EventLoopThread) -> None:
    cancelled = threading.Event()

    async def hangs() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        loop.run(hangs(), timeout=0.05)
    assert cancelled.wait(5)


def test_start_on_the_loops_own_thread_is_refused_not_a_hang(loop: EventLoopThread) -> None:
    async def inner() -> None:
        raise AssertionError("ran")

    async def outer() -> str:
        try:
            loop.start(inner())
        except RuntimeError as exc:
            return str(exc)
        return "started"

    async def on_the_loop() -> str:
        await asyncio.sleep(0.01)  # from here on the loop's thread
        return await outer()

    async def drained() -> str:
        await asyncio.sleep(0)  # goes on here, holding the loop (`_drain`)
        return await outer()

    assert "own thread" in loop.run(on_the_loop(), timeout=5)
    assert "own thread" in loop.run(drained(), timeout=5)


def test_a_wait_already_over_goes_on_on_the_callers_thread(
    loop: EventLoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes: list[int] = []
    monkeypatch.setattr(loop.loop, "_write_to_self", lambda: wakes.append(1))
    threads: list[int] = []
    hooked: list[object] = []

    async def child(n: int) -> int:
        await asyncio.sleep(0)
        return n

    async def stage() -> int:
        await asyncio.sleep(0)  # its next step is ready at once: run here
        threads.append(threading.get_ident())
        found = await asyncio.gather(child(1), child(2))  # tasks whose steps do no I/O
        threads.append(threading.get_ident())
        return sum(found)

    task = loop.start(stage(), hooked.append)
    assert task.done() and task.result() == 3
    assert threads == [threading.get_ident()] * 2 and hooked == [] and wakes == []


def test_a_drain_is_bounded_and_the_loop_does_the_rest(loop: EventLoopThread) -> None:
    threads: list[int] = []

    async def stage() -> int:
        for _ in range(200):  # more turns than one drain runs
            await asyncio.sleep(0)
        threads.append(threading.get_ident())
        return 1

    finished = threading.Event()
    suspended: list[bool] = []

    def hook(task: asyncio.Task[int]) -> None:
        suspended.append(task.done())
        task.add_done_callback(lambda _: finished.set())

    task = loop.start(stage(), hook)
    assert suspended == [False]  # not done when the drain gave up: it goes on on the loop
    assert finished.wait(5) and task.result() == 1
    assert threads == [loop.thread.ident]


def test_a_coroutine_waiting_for_io_does_not_wake_the_loop_and_still_ends(
    loop: EventLoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes: list[int] = []
    real = loop.loop._write_to_self  # type: ignore[attr-defined]

    def counted() -> None:
        wakes.append(1)
        real()

    monkeypatch.setattr(loop.loop, "_write_to_self", counted)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:

        async def lookup() -> bytes:
            return await asyncio.get_running_loop().sock_recv(ours, 16)  # a reader added here

        finished = threading.Event()
        task = loop.start(lookup(), lambda t: t.add_done_callback(lambda _: finished.set()))
        assert not task.done() and wakes == []  # the loop's epoll sees the new reader itself
        theirs.send(b"answer")
        assert finished.wait(5) and task.result() == b"answer"
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("keep", [False, True])
def test_async_generator_hooks_are_restored_unless_kept(keep: bool) -> None:
    loop = EventLoopThread()
    closed = threading.Event()
    before = sys.get_asyncgen_hooks()

    async def numbers() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            closed.set()

    generators: list[AsyncIterator[int]] = []

    async def first() -> int:
        generator = numbers()
        generators.append(generator)
        return await generator.__anext__()

    try:
        assert loop.start(first(), keep_hooks=keep).result() == 1
        assert loop.start(first(), keep_hooks=keep).result() == 1  # set already: same result
        after = sys.get_asyncgen_hooks()
        if keep:  # a thread of the loop's own (libmilter's): left set
            assert after == loop._asyncgen_hooks and after != before
        else:
            assert after == before
        loop.stop()
        assert closed.is_set()  # begun here, closed by the loop's shutdown either way
    finally:
        sys.set_asyncgen_hooks(*before)
        loop.stop()


def test_each_new_thread_gets_the_loops_async_generator_hooks() -> None:
    # Kept hooks are remembered per thread, not per thread ident: a thread started after
    # another ended often gets its ident, and still starts without the loop's hooks.
    loop = EventLoopThread()
    closed: list[int] = []
    hooks: list[bool] = []
    idents: list[int] = []

    async def numbers(n: int) -> AsyncIterator[int]:
        try:
            yield n
        finally:
            closed.append(n)

    generators: list[AsyncIterator[int]] = []

    async def first(n: int) -> int:
        generator = numbers(n)
        generators.append(generator)
        return await generator.__anext__()

    def one(n: int) -> None:
        idents.append(threading.get_ident())
        assert loop.start(first(n), keep_hooks=True).result() == n
        hooks.append(sys.get_asyncgen_hooks() == loop._asyncgen_hooks)

    try:
        for n in range(5):
            thread = threading.Thread(target=one, args=(n,))
            thread.start()
            thread.join(5)
        assert hooks == [True] * 5
        loop.stop()
        assert sorted(closed) == list(range(5))  # each registered with the loop, closed by it
    finally:
        loop.stop()
