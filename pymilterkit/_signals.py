"""The stop signals (SIGTERM, SIGINT, SIGHUP) and installing one handler for all of them."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = ["STOP_SIGNALS", "on_stop_signals"]

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
"""Signals that stop a run (the single process, or the worker supervisor and its workers)."""


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Call `handler(signal)` on a stop signal while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def receive(signum: int, frame: FrameType | None) -> None:
        handler(signal.Signals(signum))

    previous = {signum: signal.signal(signum, receive) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
