"""Pre-forked workers: one listening socket, N processes each running libmilter on it.

The GIL lets one process use about one core; N workers use N. The parent opens the socket
(so it is opened once, with the right options and permissions), forks the workers, replaces a
worker that dies, and on SIGTERM/SIGINT/SIGHUP stops them all. State is per process, as in any
pre-fork server: class attributes or module globals are not shared between workers.

The supervisor knows nothing of libmilter or of `Milter`: it gets a function that opens the
listener (and drops privileges), a function that serves on an inherited descriptor in a
worker, and a function that wakes the workers' listeners at stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Collection

from . import _metrics
from ._errors import LibmilterError, WorkerStartError
from ._libmilter import prctl
from ._listen import Listener
from ._signals import STOP_SIGNALS, on_stop_signals

__all__ = ["run_prefork"]

logger = logging.getLogger("pymilterkit")

_RESPAWN_WINDOW = 10.0
_START_FAILED = 3  # a worker's exit code when the filter's on_worker_start failed
_STOP_GRACE = 30.0


def _die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux prctl):
    a worker must not outlive its supervisor, even one killed with SIGKILL."""
    pr_set_pdeathsig = 1
    prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def _child(serve: Callable[[int, int], None], fd: int, parent: int, slot: int) -> None:
    for signum in (*STOP_SIGNALS, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    # Blocked by the parent around fork, so no stop signal ran the parent's handler here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    code = 0
    try:
        _die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)
        serve(fd, slot)
    except WorkerStartError:
        code = _START_FAILED  # logged with its traceback; the parent does not retry
    except BaseException:
        logger.exception("worker %d failed", os.getpid())
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def run_prefork(
    workers: int,
    open_socket: Callable[[], Listener],
    serve: Callable[[int, int], None],
    wake: Callable[[], None],
    name: str,
    where: str,
    tick: Callable[[Collection[int], bool], None] | None = None,
) -> None:
    """Serve with `workers` processes until a stop signal; raise if workers failed.

    `open_socket()` opens the listener (in this process, once, after the stop signals are
    handled here); `serve(fd, slot)` serves on it in worker `slot` and returns at its stop;
    `wake()` ends the workers' waits in accept() so they notice a stop at once; `name` and
    `where` (the socket) are for the log; `tick(slots, stopping)` is called about every 50 ms
    with the live workers' slots (for systemd's READY/STATUS/WATCHDOG).
    """
    parent = os.getpid()
    children: dict[int, int] = {}  # pid -> slot
    signalled: set[int] = set()  # workers sent SIGTERM
    deaths: list[float] = []
    stopping = False
    stop_deadline = 0.0
    failed = False

    def spawn(slot: int) -> None:
        # A stop signal waits until the new worker is known here (the parent's handler then
        # stops it too) and, in the worker, until it has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            _metrics.before_fork()
            pid = os.fork()
            if pid == 0:
                _child(serve, fd, parent, slot)
            children[pid] = slot
            _metrics.worker_started(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def on_signal(signum: signal.Signals) -> None:
        nonlocal stopping, stop_deadline
        if not stopping:
            stop_deadline = time.monotonic() + _STOP_GRACE
            logger.info("signal %s: stopping %d worker(s)", signum.name, len(children))
        stopping = True
        stop_workers()

    def stop_workers() -> None:
        for pid in list(children):
            if pid not in signalled:
                signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    # Handlers first: a stop that comes as soon as the socket exists is still an orderly one.
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(on_stop_signals(on_signal))
        sock = open_socket()
        cleanup.callback(sock.close)
        fd = sock.fileno()
        os.set_inheritable(fd, True)
        for slot in range(workers):
            if stopping:
                break
            spawn(slot)
        logger.info("%s: %d workers on %s", name, workers, where)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
                if tick is not None:
                    tick(children.values(), stopping)
                if stopping:
                    stop_workers()  # also one forked while the signal was being handled
                    # Wake the workers' listeners so each notices the stop at once.
                    wake()
                    if time.monotonic() > stop_deadline:
                        for pid in list(children):
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                continue
            if pid not in children:
                continue
            slot = children.pop(pid)
            _metrics.worker_exited(pid)
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                # -SIGTERM: the stop reached a worker still starting, before its handler.
                if code not in (0, -signal.SIGTERM):
                    failed = True
                    logger.error("worker %d exited with %d", pid, code)
                continue
            if code == _START_FAILED:
                logger.error("worker %d: on_worker_start failed; stopping", pid)
                failed = True
                on_signal(signal.SIGTERM)
                continue
            logger.warning("worker %d died (exit %d); starting a new one", pid, code)
            now = time.monotonic()
            deaths[:] = [t for t in deaths if now - t < _RESPAWN_WINDOW] + [now]
            if len(deaths) > 5 * workers:
                logger.error("workers keep dying; giving up")
                failed = True
                on_signal(signal.SIGTERM)
                continue
            _metrics.worker_restarted()
            spawn(slot)
    if failed:
        raise LibmilterError("one or more workers failed; see the log")
