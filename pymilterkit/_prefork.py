"""Pre-forked workers: one listening socket, N processes each running libmilter on it.

The GIL lets one process use about one core; N workers use N. The parent (the supervisor) opens
the socket (so it is opened once, with the right options and permissions) and keeps it for the
whole run, forks the workers, replaces a worker that dies, and handles the lifecycle signals:

- SIGTERM/SIGINT: every worker drains (takes no new connection, finishes its sessions, up to the
  drain timeout) and exits; a second signal (more than a second later) stops them at once.
- SIGHUP: reload. A new generation of workers is started as fresh interpreters (`spawn_fresh`:
  the filter module is imported anew, nothing of the old code's module state is carried over);
  each reports when it serves. Once all do, the old generation drains and exits. A new worker
  that exits before serving (its import or `on_worker_start` failed) cancels the reload: the old
  workers keep serving and the reason is in the log.
- A worker past its limits (sessions served, memory) tells the supervisor it retires: its
  successor is started at once while it drains.

Workers report over a pipe (`READY`, `RETIRING` + pid). Connections that arrive while no worker
listens wait in the socket's queue, which the supervisor holds open: none is refused.
State is per process, as in any pre-fork server: class attributes or module globals are not
shared between workers.

The supervisor knows nothing of libmilter or of `Milter`: it gets a function that opens the
listener (and drops privileges), a function that serves on an inherited descriptor in a forked
worker, and one that starts a fresh worker process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from . import _metrics
from ._errors import LibmilterError, WorkerStartError
from ._libmilter import prctl
from ._lifecycle import StopRequests, notify_draining, notify_ready, notify_reloading
from ._listen import Listener
from ._signals import STOP_SIGNALS, on_stop_signals

__all__ = [
    "READY",
    "READY_TIMEOUT",
    "RETIRING",
    "Supervisor",
    "control_pipe",
    "notify_supervisor",
    "read_reports",
    "run_prefork",
    "worker_main",
]

logger = logging.getLogger("pymilterkit")

_RESPAWN_WINDOW = 10.0
_START_FAILED = 3  # a worker's exit code when the filter's on_worker_start failed
_STOP_MARGIN = 10.0
"""Seconds past the drain timeout after which workers still running are killed."""
READY_TIMEOUT = 60.0
"""Seconds a reload waits for its new workers to serve before it gives up."""

READY = b"S"
RETIRING = b"R"
_MESSAGE = struct.Struct("<ci")

Serve = Callable[[int, int, int], None]
"""`serve(fd, slot, control_fd)` serves in a forked worker until its stop."""
SpawnFresh = Callable[[int, int, int], int]
"""`spawn_fresh(fd, slot, control_fd)` starts a fresh worker process and returns its pid."""


def _die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux prctl):
    a worker must not outlive its supervisor, even one killed with SIGKILL."""
    pr_set_pdeathsig = 1
    prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def notify_supervisor(control_fd: int, kind: bytes) -> None:
    """Tell the supervisor (over its pipe) that this worker serves or retires."""
    with contextlib.suppress(OSError):
        os.write(control_fd, _MESSAGE.pack(kind, os.getpid()))


def worker_main(serve: Callable[[], None], parent: int) -> None:
    """The body of a worker process (forked or fresh): serve, then exit; never returns."""
    code = 0
    try:
        _die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)
        serve()
    except WorkerStartError:
        code = _START_FAILED  # logged with its traceback; the parent does not retry
    except BaseException:
        logger.exception("worker %d failed", os.getpid())
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


@dataclass
class _Worker:
    slot: int
    generation: int
    ready: bool = False
    retiring: bool = False  # told to drain, or retiring past a limit: not replaced on exit


class Supervisor:
    """The parent of the pre-forked workers (see the module docstring)."""

    def __init__(
        self,
        workers: int,
        serve: Serve,
        spawn_fresh: SpawnFresh | None,
        name: str,
        where: str,
        drain_timeout: float,
        tick: Callable[[Collection[int], bool], None] | None = None,
    ) -> None:
        self.count = workers
        self.tick = tick
        self.serve = serve
        self.spawn_fresh = spawn_fresh
        self.name = name
        self.where = where
        self.drain_timeout = drain_timeout
        self.parent = os.getpid()
        self.workers: dict[int, _Worker] = {}
        self.generation = 0
        self.fresh = False  # after a reload every new worker is a fresh interpreter
        self.reload_started: float | None = None
        self.reload_queued = False  # a SIGHUP during a reload: reload again once it ends
        self.requests = StopRequests()
        self.stopping = False
        self.stop_deadline = 0.0
        self.failed = False
        self.deaths: list[float] = []
        self.fd = -1
        self.control_r = -1
        self.control_w = -1
        self.restarts = 0

    # -- starting workers ------------------------------------------------------------------

    def spawn(self, slot: int, generation: int) -> int | None:
        """Start a worker for `slot`: forked from this process, or fresh after a reload."""
        _metrics.before_fork()
        if self.fresh:
            assert self.spawn_fresh is not None
            try:
                pid = self.spawn_fresh(self.fd, slot, self.control_w)
            except (OSError, ValueError) as exc:
                logger.error("could not start a worker: %s", exc)
                return None
        else:
            pid = self._fork(slot)
        self.workers[pid] = _Worker(slot, generation)
        _metrics.worker_started(pid)
        if self.stopping:  # the stop signal came while it was being started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return pid

    def _fork(self, slot: int) -> int:
        # A stop signal waits until the new worker is known here (the parent's handler then
        # stops it too) and, in the worker, until it has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                for signum in (*STOP_SIGNALS, signal.SIGCHLD):
                    signal.signal(signum, signal.SIG_DFL)
                # Blocked around fork, so no stop signal ran the parent's handler here.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                os.close(self.control_r)
                worker_main(lambda: self.serve(self.fd, slot, self.control_w), self.parent)
            return pid
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    # -- signals ---------------------------------------------------------------------------

    def on_signal(self, signum: signal.Signals) -> None:
        request = self.requests.classify(signum)
        if request is None:
            return
        if request == "reload":
            self.reload()
            return
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.drain_timeout + _STOP_MARGIN
            logger.info("signal %s: draining %d worker(s)", signum.name, len(self.workers))
            notify_draining(stopping=True)
        else:
            logger.info("signal %s again: stopping the workers at once", signum.name)
        self.signal_all(signal.SIGTERM)

    def signal_all(self, signum: int, pids: list[int] | None = None) -> None:
        for pid in list(self.workers) if pids is None else pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Start a new generation of fresh workers; the old one drains once they all serve."""
        if self.stopping:
            return
        if self.spawn_fresh is None:
            logger.warning("SIGHUP: this milter cannot start fresh workers; not reloaded")
            return
        if self.reload_started is not None:
            logger.info("SIGHUP: a reload is under way; another follows it")
            self.reload_queued = True
            return
        self.reload_started = time.monotonic()
        notify_reloading()
        self.generation += 1
        logger.info("SIGHUP: reloading: starting %d fresh worker(s)", self.count)
        saved, self.fresh = self.fresh, True
        for slot in range(self.count):
            if self.spawn(slot, self.generation) is None:
                self.fresh = saved
                self._reload_failed("a new worker could not be started")
                return
        self.fresh = saved

    def _new_generation(self) -> list[int]:
        return [p for p, w in self.workers.items() if w.generation == self.generation]

    def _check_reload(self) -> None:
        if self.reload_started is None:
            return
        new = self._new_generation()
        # One ready new worker per slot (a new worker may already retire, past a limit).
        if sum(1 for p in new if self.workers[p].ready) >= self.count:
            old = [p for p, w in self.workers.items()
                   if w.generation != self.generation and not w.retiring]
            for pid in old:
                self.workers[pid].retiring = True
            self.signal_all(signal.SIGTERM, old)
            self.fresh = True
            logger.info(
                "reloaded in %.2f s: generation %d serves; %d old worker(s) drain",
                time.monotonic() - self.reload_started,
                self.generation,
                len(old),
            )
            self.reload_started = None
            notify_ready()
            self._next_reload()
        elif time.monotonic() - self.reload_started > READY_TIMEOUT:
            self._reload_failed(f"new workers did not serve within {READY_TIMEOUT:g} s")

    def _reload_failed(self, why: str) -> None:
        logger.error("reload failed: %s; the old workers keep serving", why)
        new = self._new_generation()
        for pid in new:
            self.workers[pid].retiring = True
        self.signal_all(signal.SIGTERM, new)
        self.generation += 1  # workers of the cancelled generation are never committed
        self.reload_started = None
        notify_ready()
        self._next_reload()

    def _next_reload(self) -> None:
        if self.reload_queued:
            self.reload_queued = False
            self.reload()

    # -- reports and exits -----------------------------------------------------------------

    def read_reports(self) -> None:
        for kind, pid in read_reports(self.control_r):
            self._report(kind, pid)

    def _report(self, kind: bytes, pid: int) -> None:
        worker = self.workers.get(pid)
        if worker is None:
            return
        if kind == READY:
            worker.ready = True
        elif kind == RETIRING and not worker.retiring and not self.stopping:
            worker.retiring = True
            self.restarts += 1
            _metrics.worker_restarted()  # recycling counts as a restart
            self.spawn(worker.slot, worker.generation)

    def reaped(self, pid: int, status: int) -> None:
        worker = self.workers.pop(pid, None)
        if worker is None:
            return
        _metrics.worker_exited(pid)
        code = os.waitstatus_to_exitcode(status)
        if self.stopping or worker.retiring:
            # -SIGTERM: the stop reached a worker still starting, before its handler.
            if code not in (0, -signal.SIGTERM) and not (worker.retiring and not worker.ready):
                self.failed = self.failed or self.stopping
                logger.error("worker %d exited with %d", pid, code)
            return
        if self.reload_started is not None and worker.generation == self.generation:
            self._reload_failed(f"new worker {pid} exited with {code} before serving (see above)")
            return
        if code == _START_FAILED:
            logger.error("worker %d: on_worker_start failed; stopping", pid)
            self.failed = True
            self.on_signal(signal.SIGTERM)
            return
        logger.warning("worker %d died (exit %d); starting a new one", pid, code)
        now = time.monotonic()
        self.deaths[:] = [t for t in self.deaths if now - t < _RESPAWN_WINDOW] + [now]
        if len(self.deaths) > 5 * self.count:
            logger.error("workers keep dying; giving up")
            self.failed = True
            self.on_signal(signal.SIGTERM)
            return
        self.restarts += 1
        _metrics.worker_restarted()
        self.spawn(worker.slot, worker.generation)

    # -- the run ---------------------------------------------------------------------------

    def run(self, open_socket: Callable[[], Listener]) -> None:
        # Handlers first: a stop that comes as soon as the socket exists is still an orderly one.
        with contextlib.ExitStack() as cleanup:
            cleanup.enter_context(on_stop_signals(self.on_signal))
            sock = open_socket()
            cleanup.callback(sock.close)
            self.fd = sock.fileno()
            os.set_inheritable(self.fd, True)
            self.control_r, self.control_w = control_pipe()
            cleanup.callback(os.close, self.control_r)
            cleanup.callback(os.close, self.control_w)
            for slot in range(self.count):
                if self.stopping:
                    break
                self.spawn(slot, self.generation)
            logger.info("%s: %d workers on %s", self.name, self.count, self.where)
            self.loop()
        if self.failed:
            raise LibmilterError("one or more workers failed; see the log")

    def adopt(self, listener: Listener, control: tuple[int, int], pid: int, stop: bool) -> None:
        """Supervise `pid`, the fresh worker a single process handed its socket to at reload,
        from now on (every later worker is fresh too); `stop`: a stop signal came already."""
        self.fd = listener.fileno()
        os.set_inheritable(self.fd, True)
        self.control_r, self.control_w = control
        self.fresh = True
        self.workers[pid] = _Worker(0, self.generation, ready=True)
        with contextlib.ExitStack() as cleanup:
            cleanup.enter_context(on_stop_signals(self.on_signal))
            cleanup.callback(listener.close)
            cleanup.callback(os.close, self.control_r)
            cleanup.callback(os.close, self.control_w)
            if stop:
                self.on_signal(signal.SIGTERM)
            self.loop()
        if self.failed:
            raise LibmilterError("one or more workers failed; see the log")

    def loop(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.read_reports()  # a worker's last report before its exit
                self.reaped(pid, status)
                continue
            time.sleep(0.02)
            if self.tick is not None:
                self.tick([w.slot for w in self.workers.values()], self.stopping)
            self.read_reports()
            self._check_reload()
            if self.stopping and time.monotonic() > self.stop_deadline:
                logger.error("%d worker(s) still running past the drain timeout: killed",
                             len(self.workers))
                self.stop_deadline = float("inf")
                self.signal_all(signal.SIGKILL)


def control_pipe() -> tuple[int, int]:
    """The pipe workers report on: a non-blocking read end, an inheritable write end."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_inheritable(write, True)
    return read, write


def read_reports(fd: int) -> list[tuple[bytes, int]]:
    """The (kind, pid) reports waiting on `fd`."""
    reports: list[tuple[bytes, int]] = []
    while True:
        try:
            data = os.read(fd, _MESSAGE.size * 64)
        except (BlockingIOError, InterruptedError):
            return reports
        except OSError:
            return reports
        if not data:
            return reports
        for offset in range(0, len(data) - _MESSAGE.size + 1, _MESSAGE.size):
            kind, pid = _MESSAGE.unpack_from(data, offset)
            reports.append((kind, pid))


def run_prefork(
    workers: int,
    open_socket: Callable[[], Listener],
    serve: Serve,
    name: str,
    where: str,
    *,
    spawn_fresh: SpawnFresh | None = None,
    drain_timeout: float = 30.0,
    tick: Callable[[Collection[int], bool], None] | None = None,
) -> None:
    """Serve with `workers` processes until a stop signal; raise if workers failed.

    `open_socket()` opens the listener (in this process, once, after the signals are handled
    here); `serve(fd, slot, control_fd)` serves on it in forked worker `slot` and returns at
    its stop, reporting on `control_fd` (`notify_supervisor`);
    `spawn_fresh(fd, slot, control_fd)` starts a fresh worker process (for SIGHUP; None: no
    reload); `name` and `where` (the socket) are for the log; `tick(slots, stopping)` is called
    about every 20 ms with the live workers' slots (for systemd's READY/STATUS/WATCHDOG).
    """
    Supervisor(workers, serve, spawn_fresh, name, where, drain_timeout, tick).run(open_socket)
