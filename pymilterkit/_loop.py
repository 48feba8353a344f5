"""The event loop that runs `async def` stage methods: one per serving process, on its thread.

libmilter calls stage methods on its own worker threads, which cannot await. A coroutine is
handed to this loop (`call`, `run`) and its answer goes back to libmilter either by the worker
waiting for it (`run`) or, for stages whose reply can be sent later, by the loop itself once the
coroutine is done (`_trampolines`): the worker is then free for other connections at once.
Shared clients created in `on_worker_start` (httpx, a resolver, a pool) live on this loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["EventLoopThread"]

_T = TypeVar("_T")


class EventLoopThread:
    """An asyncio loop running on a daemon thread of its own, until `stop()`."""

    def __init__(self, name: str = "pymilterkit-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def thread(self) -> threading.Thread:
        """The loop's thread."""
        return self._thread

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run `function(*args)` on the loop's thread, soon; safe from any thread."""
        self.loop.call_soon_threadsafe(function, *args)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run `coro` on the loop and wait for its result here (not on the loop's thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self, grace: float = 5.0) -> None:
        """Cancel what still runs (up to `grace` seconds), then stop and close the loop."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # stopping: nothing left to report to
                self.run(_cancel_all(grace), timeout=grace + 1.0)
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
