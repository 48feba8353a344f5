"""Every signal the runner handles, in one place: the stop signals (SIGTERM, SIGINT, SIGHUP)
turned into requests (`handled`), the signal that wakes libmilter's listener (`wake_handler`),
and the masking around a fork (`forking`).

`StopRequests` turns the stop signals into decisions: SIGTERM/SIGINT drain, a second one (more
than `SIGNAL_DEBOUNCE` later: the copy a supervisor forwards, or a service manager's signal to
every process of the unit, is the same request) stops at once, SIGHUP reloads. Whoever owns the
run (the supervisor, or a serving worker) is the `Target` that carries them out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Literal, Protocol

__all__ = [
    "HANDLED_SIGNALS",
    "RETIRED_BY_RELOAD",
    "RETIRE_SIGNAL",
    "SIGNAL_DEBOUNCE",
    "STOP_SIGNALS",
    "WAKE_SIGNAL",
    "StopRequests",
    "Target",
    "fork",
    "handled",
    "wake_handler",
]

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
"""Signals that stop a run (the single process, or the worker supervisor and its workers)."""
RETIRE_SIGNAL = signal.SIGUSR2
"""From a supervisor to the workers a reload replaced: drain and exit, saying so."""
RETIRED_BY_RELOAD = "a reload replaced this worker"
HANDLED_SIGNALS = STOP_SIGNALS | {RETIRE_SIGNAL}
"""Every signal `handled` routes; blocked in a new process until its handlers are in place."""

WAKE_SIGNAL = signal.SIGURG
"""Sent to libmilter's listener thread to end its poll (ignored by default; never sent by the
kernel to a process that did not ask for it with F_SETOWN)."""

SIGNAL_DEBOUNCE = 1.0
"""A stop signal this soon after the first is the same request (not a "second SIGTERM")."""

Request = Literal["drain", "now", "reload"]


class StopRequests:
    """What a signal asks for: `drain`, `now` (a second stop signal) or `reload` (SIGHUP)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: float | None = None

    def classify(self, signum: int) -> Request | None:
        """The request `signum` makes now; None for a repeat within `SIGNAL_DEBOUNCE`."""
        if signum == signal.SIGHUP:
            return "reload"
        now = self._clock()
        if self._first is None:
            self._first = now
            return "drain"
        if now - self._first < SIGNAL_DEBOUNCE:
            return None
        return "now"

    @property
    def draining(self) -> bool:
        """Whether a stop signal came."""
        return self._first is not None


class Target(Protocol):
    """What carries out the requests; `reason` is e.g. "signal SIGTERM", for the log."""

    def drain(self, reason: str) -> None: ...
    def stop_now(self, reason: str) -> None: ...
    def reload(self, reason: str) -> None: ...


@contextlib.contextmanager
def handled(target: Target) -> Iterator[None]:
    """While the block runs, the stop signals become `target`'s drain, stop_now and reload."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    requests = StopRequests()

    def receive(signum: int, frame: FrameType | None) -> None:
        if signum == RETIRE_SIGNAL:
            target.drain(RETIRED_BY_RELOAD)
            return
        request = requests.classify(signum)
        reason = f"signal {signal.Signals(signum).name}"
        if request == "drain":
            target.drain(reason)
        elif request == "now":
            target.stop_now(reason)
        elif request == "reload":
            target.reload(reason)

    previous = {signum: signal.signal(signum, receive) for signum in HANDLED_SIGNALS}
    # A new process starts with them blocked (`fork`, `_fresh`): one that came while it was
    # starting waits until now and is handled like any other.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def fork(child: Callable[[], None]) -> int:
    """Fork; the child runs `child()` (which must not return) with the stop signals at their
    defaults and blocked. A stop signal waits until the new pid is known here (the parent's
    handler then stops it too) and, in the child, until `handled` has its handlers in place:
    a SIGHUP sent to the whole process group while a worker starts neither kills it nor
    counts as a death."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            for signum in (*HANDLED_SIGNALS, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            child()  # the stop signals stay blocked until `handled` unblocks them
        return pid
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


@contextlib.contextmanager
def wake_handler() -> Iterator[bool]:
    """Install the no-op handler that lets `WAKE_SIGNAL` interrupt a poll (main thread only);
    yields whether it is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.signal(WAKE_SIGNAL, _ignore)
    try:
        yield True
    finally:
        signal.signal(WAKE_SIGNAL, previous)


def _ignore(signum: int, frame: object) -> None:
    pass
