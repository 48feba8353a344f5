"""The event loop that runs `async def` stage methods: one per serving process, on its thread.

libmilter calls stage methods on its own worker threads, which cannot await. A coroutine's
first step runs at once on the calling thread (`start`: the loop's thread is kept out for that
step by a lock it holds except while it waits in `select`), so a coroutine that finishes without
suspending never crosses threads; nor does one whose wait is over before the step ends (the
loop's ready callbacks run there too, `_drain`: `asyncio.sleep(0)`, gathered tasks that do no
I/O). One that really waits goes on as a task of the loop (woken only if the step left it a
callback or an earlier timer: epoll sees the fds added meanwhile), whose answer
goes back to libmilter either by the worker waiting for it (`run`) or, for stages whose reply
can be sent later, by the loop itself once the coroutine is done (`_trampolines`): the worker is
then free for other connections at once.
Shared clients created in `on_worker_start` (httpx, a resolver, a pool) live on this loop.

asyncio internals relied on (this module is the only user; tests/unit/test_foreign_internals.py
fails if one changes). asyncio has no public way to run a task's first step on another thread
than the loop's, so `start` does what the loop's own `_run_once` would, with the loop kept out:

- `asyncio.events._set_running_loop` and the loop's `_asyncgen_firstiter_hook` /
  `_asyncgen_finalizer_hook`: set on the calling thread for that step, as `run_forever` sets
  them on the loop's (`get_running_loop()` and async generators work in the first step);
- `loop._ready`, `loop._scheduled`, `loop._timer_cancelled_count`, `loop._write_to_self()`:
  whether the step left the loop work, and waking it only then (a wake-up costs a write);
- `Handle._cancelled` and `Handle._run()`: `_drain` runs ready callbacks as the loop's turn;
- `loop._thread_id` and `loop._debug`: in debug mode the loop checks that it is called from
  its thread; `_thread_id` is lent to the calling thread for the step;
- the first step itself: `asyncio.Task(..., eager_start=True)` (public, 3.12+). On 3.11 the
  task's first `loop.call_soon` is caught by an instance attribute of that name (the task looks
  the method up on the loop) and run here; if it is not caught, the step runs on the loop.

All present from 3.11 through 3.14 (checked against CPython 3.14's base_events.py and tasks:
3.14 keeps the running loop and current task per thread state, which `_set_running_loop` and the
eager start set on the calling thread). Where a name is missing, the loop logs one WARNING and
`start` uses the public API only: every step runs on the loop's thread (a thread crossing per
async stage, no other change). `_LockedSelector` uses only the public selector interface.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import selectors
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["EventLoopThread"]

_T = TypeVar("_T")
logger = logging.getLogger("pymilterkit")
_set_running_loop: Any = getattr(asyncio.events, "_set_running_loop", None)
_EAGER = sys.version_info >= (3, 12)  # asyncio.Task(..., eager_start=True)
_Task: Any = asyncio.Task  # (typed for 3.11, which has no eager_start)
_get_ident = threading.get_ident
_LOOP_INTERNALS = (
    "_asyncgen_finalizer_hook",
    "_asyncgen_firstiter_hook",
    "_debug",
    "_ready",
    "_scheduled",
    "_thread_id",
    "_timer_cancelled_count",
    "_write_to_self",
)
_HANDLE_INTERNALS = ("_cancelled", "_run")
_DRAIN = 64  # ready callbacks a suspended first step's thread may run (`_drain`)
# A cancelled timer stays in the loop's heap until the loop runs: wake it past this many.
_CANCELLED_TIMERS = 64


class _LockedSelector(selectors.DefaultSelector):
    """The loop's selector: the loop's thread holds `lock` except while it waits in select."""

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self.pmk_lock = lock

    pmk_busy: float | None = None
    """When the loop's current turn began (perf_counter), None while it waits: a turn that
    lasts is a blocking call on the loop (`_trampolines.Watchman` reports it)."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        lock = self.pmk_lock
        self.pmk_busy = None
        lock.release()
        try:
            return super().select(timeout)
        finally:
            lock.acquire()
            self.pmk_busy = time.perf_counter()


class _FirstStep:
    """Takes the place of the loop's `call_soon` while a task is built: keeps its first step
    (3.11, which has no eager tasks; `EventLoopThread.start`)."""

    __slots__ = ("context", "step")

    def __init__(self) -> None:
        self.step: Callable[[], object] | None = None
        self.context: Any = None

    def __call__(self, step: Callable[[], object], *, context: Any = None) -> None:
        self.step, self.context = step, context

    def run(self, coro: Coroutine[Any, Any, _T], loop: Any) -> Any:
        """A task of `loop` for `coro` whose first step has run, here and now (loop kept out).

        The task asks the loop to call its first step soon (a lookup of `call_soon` on the
        loop): handed to this object, set as an instance attribute for that one call, the step
        runs here instead. One object per loop: its callers hold the loop's lock."""
        loop.call_soon = self
        try:
            task = asyncio.Task(coro, loop=loop)
        finally:
            del loop.call_soon
        step, self.step = self.step, None
        if step is None:  # not caught: the loop's own call_soon has it, the loop runs it
            return task
        context, self.context = self.context, None
        context.run(step)
        return task


def _drain(ready: collections.deque[asyncio.Handle], task: asyncio.Task[Any]) -> None:
    """Run the loop's ready callbacks here (loop kept out), in the order its turns would, until
    `task` is done, nothing is ready or `_DRAIN` ran: a wait already over when the first step
    suspended (`asyncio.sleep(0)`, tasks gathered whose steps do no I/O) ends without a thread
    crossing. Called with a callback ready and `task` not done."""
    for _ in range(_DRAIN):
        handle: Any = ready.popleft()
        if not handle._cancelled:
            handle._run()
        if not ready or task.done():
            return


def _internals_problem(loop: Any) -> str | None:
    """What of asyncio's internals `start` relies on `loop` lacks, or None."""
    missing = [f"loop.{name}" for name in _LOOP_INTERNALS if not hasattr(loop, name)]
    if _set_running_loop is None:
        missing.append("asyncio.events._set_running_loop")
    missing += [f"asyncio.Handle.{name}" for name in _HANDLE_INTERNALS
                if not hasattr(asyncio.Handle, name)]
    if missing:
        return "missing " + ", ".join(missing)
    if not isinstance(loop._ready, collections.deque) or not isinstance(loop._scheduled, list):
        return "loop._ready is not a deque or loop._scheduled not a list"
    return None


class _Warned:
    """Whether the fallback of `EventLoopThread.start` was logged in this process."""

    done = False


class EventLoopThread:
    """An asyncio loop running on a daemon thread of its own, until `stop()`."""

    def __init__(self, name: str = "pymilterkit-loop") -> None:
        self.lock = threading.Lock()
        """Held by the loop's thread except while it waits for events (`start`)."""
        self.selector = _LockedSelector(self.lock)
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self._epoll = isinstance(self.selector, selectors.EpollSelector)  # sees fds added later
        self.stopping = False
        self.on_restart: Callable[[], object] = lambda: None
        """Called (on the loop's thread) when the loop is run again after a stage stopped it."""
        self.on_down: Callable[[], object] = lambda: None
        """Called (on the loop's thread) when the loop was closed and cannot run again."""
        problem = _internals_problem(self.loop)
        if problem is None:
            loop: Any = self.loop
            self._asyncgen_hooks = (loop._asyncgen_firstiter_hook, loop._asyncgen_finalizer_hook)
        else:
            self.start = self._start_on_loop  # type: ignore[method-assign]
            if not _Warned.done:
                _Warned.done = True
                logger.warning(
                    "asyncio internals differ on Python %s (%s): async stages take every "
                    "step on the event loop's thread (a thread crossing per stage)",
                    sys.version.split()[0],
                    problem,
                )
        self._owner: int | None = None  # the thread `start` runs the loop's steps on
        # Set on the threads that keep the loop's async generator hooks (a thread-local: it
        # ends with its thread, where a set of idents would hold a new thread's reused one).
        self._hooked = threading.local()
        self._eager_task = _FirstStep().run  # 3.11 (`start`)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ident = self._thread.ident
        self._ready.wait()

    def _main(self) -> None:
        self.loop.call_soon(self._ready.set)
        with self.lock:
            while True:
                try:
                    self.loop.run_forever()
                except BaseException as exc:  # noqa: BLE001 - a loop that fails is run again
                    failure: BaseException | None = exc
                else:
                    failure = None
                    if self.stopping:
                        return
                if self.loop.is_closed():  # cannot run again: said and counted at once
                    logger.critical("the event loop was closed (by a stage?): async stages "
                                    "cannot be served", exc_info=failure)
                    self.on_down()
                    return
                if failure is not None:
                    logger.error("the event loop failed: %r", failure, exc_info=failure)
                else:
                    logger.error("the event loop was stopped (by a stage?): running it again")
                self.on_restart()

    @property
    def alive(self) -> bool:
        """Whether the loop runs (or will run again at once): async stages can be served."""
        return self._thread.is_alive() and not self.loop.is_closed() and not self.stopping

    @property
    def thread(self) -> threading.Thread:
        """The loop's thread."""
        return self._thread

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run `function(*args)` on the loop's thread, soon; safe from any thread."""
        self.loop.call_soon_threadsafe(function, *args)

    def start(
        self,
        coro: Coroutine[Any, Any, _T],
        suspended: Callable[..., object] | None = None,
        *args: Any,
        keep_hooks: bool = False,
    ) -> asyncio.Task[_T]:
        """`coro` as a task of the loop whose first step runs now, on the calling thread.

        The task is done on return if the coroutine finished without suspending: nothing
        crossed threads. Otherwise it goes on on the loop, and `suspended(task, *args)` has run
        first, still with the loop kept out (to add done callbacks, timers). Not from the
        loop's thread. A KeyboardInterrupt or SystemExit of the step is raised here (a task
        re-raises those; its other exceptions are the task's).
        `keep_hooks`: leave the loop's async generator hooks set on this thread (a thread that
        runs only this loop's steps, as libmilter's do: setting and restoring them each time
        cost a tenth of a step).
        """
        loop: Any = self.loop
        caller = _get_ident()
        if caller == self._ident or caller == self._owner:  # it holds the lock: say so, not
            coro.close()  # hang (a step run here by `_drain` is the loop's too)
            raise RuntimeError("EventLoopThread.start called on the loop's own thread")
        with self.lock:  # the loop's thread waits in select, or for this lock
            owner = loop._thread_id
            if owner is None:  # not running (is_running(), one call less)
                coro.close()
                raise RuntimeError("the event loop is not running")
            ready, scheduled = loop._ready, loop._scheduled
            head = scheduled[0] if scheduled else None
            debug = loop._debug
            if debug:  # its checks that the loop's methods run on the loop's thread
                loop._thread_id = caller
            _set_running_loop(loop)
            hooks = None  # async generators begun here belong to the loop
            hooked = self._hooked.__dict__  # (this thread's: faster than an attribute)
            if not hooked:  # not a thread that keeps the loop's hooks set
                hooks = sys.get_asyncgen_hooks()
                if hooks != self._asyncgen_hooks:
                    sys.set_asyncgen_hooks(*self._asyncgen_hooks)
                else:
                    hooks = None
                if keep_hooks:
                    hooked["kept"] = True
                    hooks = None
            self._owner = caller
            try:
                if _EAGER:
                    task: asyncio.Task[_T] = _Task(coro, loop=loop, eager_start=True)
                else:
                    task = self._eager_task(coro, loop)
                if ready and not task.done():
                    _drain(ready, task)
                done = task.done()
                if not done and suspended is not None:
                    suspended(task, *args)
            finally:
                if hooks is not None:
                    sys.set_asyncgen_hooks(*hooks)
                _set_running_loop(None)
                if debug:
                    loop._thread_id = owner
                self._owner = None
            # A suspended task waits for a future: one the loop resolves from I/O on an fd the
            # selector watches (epoll sees fds added meanwhile), a timer or a callback made
            # ready in this step; another thread's call_soon_threadsafe wakes the loop itself.
            # The loop must be woken only for the latter two (a wake costs a write, a turn).
            wake = (
                (not done and not self._epoll)
                or ready
                or (scheduled and scheduled[0] is not head)
                or loop._timer_cancelled_count > _CANCELLED_TIMERS
            )
        if wake:  # it has work: end its select, once the lock is free for it to take
            loop._write_to_self()
        return task

    def _start_on_loop(
        self,
        coro: Coroutine[Any, Any, _T],
        suspended: Callable[..., object] | None = None,
        *args: Any,
        keep_hooks: bool = False,  # unused: every step runs on the loop's thread
    ) -> asyncio.Task[_T]:
        """`start` by the public API only (asyncio's internals differ): `coro` becomes a task
        on the loop's thread, where `suspended(task, *args)` runs before its first step."""
        if threading.get_ident() == self._ident:
            coro.close()
            raise RuntimeError("EventLoopThread.start called on the loop's own thread")
        created: concurrent.futures.Future[asyncio.Task[_T]] = concurrent.futures.Future()

        def begin() -> None:
            try:
                task = self.loop.create_task(coro)
                if suspended is not None:
                    suspended(task, *args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                created.set_exception(exc)
            else:
                created.set_result(task)

        if not self.loop.is_running():
            coro.close()
            raise RuntimeError("the event loop is not running")
        self.loop.call_soon_threadsafe(begin)
        while True:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                return created.result(timeout=1.0)
            if not self.loop.is_running():  # stopped before it got to `begin`
                coro.close()
                raise RuntimeError("the event loop is not running")

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run `coro` (its first step here, see `start`) and wait here for its result; not
        on the loop's thread. Past `timeout` seconds it is cancelled (TimeoutError)."""
        finished = threading.Event()

        def suspended(task: asyncio.Task[_T]) -> None:
            task.add_done_callback(lambda _: finished.set())

        task = self.start(coro, suspended)
        if not task.done() and not finished.wait(timeout):
            self.loop.call_soon_threadsafe(task.cancel)
            raise TimeoutError(f"the coroutine ran past {timeout} s")
        return task.result()

    def stop(self, grace: float = 5.0) -> None:
        """Cancel what still runs (up to `grace` seconds), then stop and close the loop."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # stopping: nothing left to report to
                self.run(_cancel_all(grace), timeout=grace + 1.0)
            self.stopping = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(grace + 1.0)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_all(grace: float) -> None:
    """Cancel every task but this one and wait (bounded) for them; then close async gens."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=grace)
    await asyncio.get_running_loop().shutdown_asyncgens()


class InlineLoop:
    """An asyncio loop run in the caller's thread, one coroutine at a time (the harness)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` to its end on this loop (created at first use)."""
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            # Closed with its owner at the latest (a harness nobody closed).
            weakref.finalize(self, self.loop.close)
        return self.loop.run_until_complete(coro)

    def stop(self) -> None:
        """Cancel what is left and close the loop."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.run_until_complete(_cancel_all(1.0))
            self.loop.close()


def call_hook(result: Awaitable[None] | None, run: Callable[[Any], Any]) -> None:
    """Finish a hook's call: an `async def` hook's coroutine is run with `run`."""
    if isinstance(result, Coroutine):
        run(result)
    elif isinstance(result, Awaitable):
        async def wait() -> None:
            await result

        run(wait())
