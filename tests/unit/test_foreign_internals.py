"""What pymilterkit relies on in foreign code, checked on this interpreter and C library.

Each room that depends on something its owner never promised has a test here that fails when
that something changes: libmilter's private layout (`_libmilter_private`: its fallback is
logged once), asyncio's loop internals (`_loop`) and CPython's thread-state API
(`_threadstate`). And `import pymilterkit` has no side effects beyond defining names.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pymilterkit import _libmilter_private, _loop, _threadstate

# -- libmilter's private layout -----------------------------------------------------------------


def test_an_unknown_layout_is_logged_once_with_what_falls_back_and_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_libmilter_private._Layout, "known", None)
    monkeypatch.setattr(_libmilter_private, "version", lambda: (1, 0, 2))
    with caplog.at_level(logging.WARNING, logger="pymilterkit"):
        for _ in range(3):
            assert not _libmilter_private.layout_known(0)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    message = caplog.records[0].getMessage()
    assert "libmilter_version() 1.0.2" in message
    assert "layout check: smfi_version() is 1.0.2, not 1.0.1" in message
    assert "late answers" in message and "bounded macro reads" in message


# -- asyncio's loop internals (`_loop`) ---------------------------------------------------------


@pytest.fixture
def bare_loop() -> Iterator[Any]:
    loop = asyncio.SelectorEventLoop()
    yield loop
    loop.close()


def test_the_loop_internals_start_relies_on_are_present(bare_loop: Any) -> None:
    assert _loop._internals_problem(bare_loop) is None


def test_the_loop_internals_mean_what_start_assumes(bare_loop: Any) -> None:
    loop = bare_loop
    assert loop._thread_id is None and loop._debug is loop.get_debug()  # not running yet
    handle = loop.call_soon(lambda: None)
    assert list(loop._ready) == [handle]  # what the loop runs next turn
    timer = loop.call_later(60, lambda: None)
    assert loop._scheduled == [timer]  # a heap of timers
    timer.cancel()
    assert loop._timer_cancelled_count == 1  # cancelled, left in the heap until a turn
    seen: dict[str, object] = {}

    def inside() -> None:
        seen["thread_id"] = loop._thread_id
        seen["hooks"] = sys.get_asyncgen_hooks()
        loop.stop()

    loop.call_soon(inside)
    loop.run_forever()
    assert seen["thread_id"] == threading.get_ident()
    assert seen["hooks"] == (loop._asyncgen_firstiter_hook, loop._asyncgen_finalizer_hook)
    _loop._set_running_loop(loop)  # what makes get_running_loop() work off the loop's thread
    try:
        assert asyncio.get_running_loop() is loop
    finally:
        _loop._set_running_loop(None)


def test_a_ready_handle_runs_as_the_drain_assumes(bare_loop: Any) -> None:
    # `_drain` runs the loop's ready handles as its turn does: skip a cancelled one, `_run()`
    # the others (their context, their exceptions to the loop's handler).
    ran: list[str] = []
    errors: list[dict[str, Any]] = []
    bare_loop.set_exception_handler(lambda loop, context: errors.append(context))
    kept = bare_loop.call_soon(ran.append, "kept")
    dropped = bare_loop.call_soon(ran.append, "dropped")
    dropped.cancel()
    bare_loop.call_soon(lambda: 1 / 0)
    assert not kept._cancelled and dropped._cancelled
    while bare_loop._ready:
        handle = bare_loop._ready.popleft()
        if not handle._cancelled:
            handle._run()
    assert ran == ["kept"]
    assert [type(e["exception"]) for e in errors] == [ZeroDivisionError]


def test_epoll_reports_an_fd_registered_while_another_thread_waits() -> None:
    # `start` does not wake the loop for a task that waits on I/O: the loop's epoll_wait,
    # already waiting, reports readers added meanwhile from another thread.
    import selectors
    import socket

    selector = selectors.EpollSelector()
    ours, theirs = socket.socketpair()
    try:
        got: list[list[Any]] = []
        waiting = threading.Thread(target=lambda: got.append(selector.select(5)))
        waiting.start()
        threading.Event().wait(0.05)  # it is in epoll_wait by now (it blocks 5 s otherwise)
        selector.register(ours, selectors.EVENT_READ, "reader")
        theirs.send(b"x")
        waiting.join(5)
        assert [key.data for key, _ in got[0]] == ["reader"]
    finally:
        selector.close()
        ours.close()
        theirs.close()


def test_a_tasks_first_step_can_run_on_the_calling_thread() -> None:
    # What `EventLoopThread.start` does, step by step: the loop kept out by its lock, this
    # thread made its running thread, the task created eagerly (3.12+: eager_start; 3.11: its
    # first call_soon caught, tested here on every version: a task not eager calls it).
    thread = _loop.EventLoopThread()
    loop: Any = thread.loop
    steps: list[int] = []

    async def step() -> str:
        steps.append(threading.get_ident())
        assert asyncio.get_running_loop() is loop
        return "done"

    try:
        with thread.lock:
            assert loop.is_running()
            queued = len(loop._ready)
            _loop._set_running_loop(loop)
            try:
                task = _loop._FirstStep().run(step(), loop)
            finally:
                _loop._set_running_loop(None)
            assert task.done() and task.result() == "done"
            assert len(loop._ready) == queued  # nothing left for the loop: it need not be woken
        assert steps == [threading.get_ident()]
    finally:
        thread.stop()


def test_the_loops_lock_is_free_while_it_waits_for_events() -> None:
    loop = _loop.EventLoopThread()
    try:
        assert loop.lock.acquire(timeout=5)  # the loop waits in its selector's select
        loop.lock.release()
    finally:
        loop.stop()


def test_without_the_internals_every_step_runs_on_the_loop_and_it_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_loop, "_internals_problem", lambda loop: "missing loop._ready")
    monkeypatch.setattr(_loop._Warned, "done", False)
    threads: list[int] = []

    async def stage() -> int:
        threads.append(threading.get_ident())
        await asyncio.sleep(0)
        threads.append(threading.get_ident())
        return 7

    with caplog.at_level(logging.WARNING, logger="pymilterkit"):
        loops = [_loop.EventLoopThread(), _loop.EventLoopThread()]
    try:
        loop = loops[0]
        hooked: list[int] = []
        task = loop.start(stage(), lambda task: hooked.append(threading.get_ident()))
        assert loop.run(asyncio.wait_for(task, 5)) == 7
        assert hooked == [loop.thread.ident] and threads == [loop.thread.ident] * 2
        assert loop.run(stage(), timeout=5) == 7
    finally:
        for each in loops:
            each.stop()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # once per process
    message = caplog.records[0].getMessage()
    assert f"Python {platform.python_version()}" in message
    assert "missing loop._ready" in message and "event loop's thread" in message
    with pytest.raises(RuntimeError, match="not running"):
        loops[0].start(stage())


# -- CPython's thread states (`_threadstate`) ---------------------------------------------------
#
# libmilter's workers are threads Python did not start. A foreign thread is made here with the
# C library alone: pthread_create runs dl_iterate_phdr, whose only argument (the thread's) is a
# callback it calls once per loaded object: Python is entered and left several times from one
# foreign thread, as libmilter does.

_PHDR_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def _in_a_foreign_thread(callback: Callable[[], None], calls: int) -> None:
    libc = ctypes.CDLL(None)
    create, join = libc.pthread_create, libc.pthread_join
    create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p]
    join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    made: list[None] = []

    def each(info: int, size: int, data: int) -> int:
        callback()
        made.append(None)
        return 1 if len(made) >= calls else 0  # nonzero: dl_iterate_phdr stops

    function = _PHDR_CALLBACK(each)
    thread = ctypes.c_ulong()
    start = ctypes.cast(libc.dl_iterate_phdr, ctypes.c_void_p)
    assert create(ctypes.byref(thread), None, start, ctypes.cast(function, ctypes.c_void_p)) == 0
    assert join(thread, None) == 0  # the thread has ended (and released the GIL between calls)
    assert len(made) == calls


@pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "pinned"])
def test_a_foreign_threads_state_lives_across_callbacks_only_when_pinned(pinned: bool) -> None:
    local = threading.local()
    seen: list[tuple[int, int | None]] = []

    def callback() -> None:
        if pinned:
            _threadstate.pin_thread_state()
        seen.append((threading.get_native_id(), getattr(local, "calls", None)))
        local.calls = len(seen)

    before = _threadstate.thread_state_count()
    _in_a_foreign_thread(callback, 3)
    assert len({native for native, _ in seen}) == 1  # one OS thread
    if pinned:  # one thread state for all three, left behind by the ended thread
        assert [calls for _, calls in seen] == [None, 1, 2]
        assert _threadstate.thread_state_count() == before + 1
        assert _threadstate.release_exited_thread_states() == 1
    else:  # ctypes made and freed one per callback: what pinning saves
        assert [calls for _, calls in seen] == [None, None, None]
    assert _threadstate.thread_state_count() == before
    assert _threadstate.release_exited_thread_states() == 0


# -- importing the package ----------------------------------------------------------------------

_IMPORT_PROBE = """
import atexit, json, logging, os, signal, sys, threading
calls = []

def recorder(name, real):
    def call(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("pymilterkit"):  # the standard library's own do not count
            calls.append(f"{caller}: {name}")
        return real(*args, **kwargs)
    return call

os.register_at_fork = recorder("os.register_at_fork", os.register_at_fork)
atexit.register = recorder("atexit.register", atexit.register)
signal.signal = recorder("signal.signal", signal.signal)
sys.excepthook_before = sys.excepthook
import pymilterkit, pymilterkit.testing
loggers = [logging.getLogger()] + [
    lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
]
print(json.dumps({
    "calls": calls,
    "libmilter mapped": "libmilter" in open("/proc/self/maps").read(),
    "logger filters": [lg.name for lg in loggers if lg.filters],
    "logger handlers": [lg.name for lg in loggers if lg.handlers],
    "logger levels": [lg.name for lg in loggers if lg.name != "root" and lg.level],
    "threads": threading.active_count(),
    "excepthook": sys.excepthook is sys.excepthook_before,
}))
"""


def test_importing_the_package_only_defines_names() -> None:
    env = {**os.environ, "PYMILTERKIT_LIBMILTER": "/nonexistent/libmilter.so.1.0.1"}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], env=env, capture_output=True, text=True,
        timeout=60, check=True,
    )
    assert json.loads(done.stdout) == {
        "calls": [],
        "libmilter mapped": False,
        "logger filters": [],
        "logger handlers": [],
        "logger levels": [],
        "threads": 1,
        "excepthook": True,
    }
