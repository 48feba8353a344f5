"""One serving process: registers the session class with libmilter, serves on a listening
descriptor until stopped, drains, and retires past its limits.

libmilter allows one `smfi_main` per process (a stop is sticky), so a process has one `Server`.
`smfi_main` runs on a thread of its own, leaving the main thread Python's signal handling
(`_signals`). A drain closes libmilter's listener to new connections (`_lifecycle.Gate`), lets
sessions in flight finish (up to `drain_timeout`), then stops; `smfi_stop` runs on a helper
thread while the listener is woken from its 5 s poll (`_lifecycle.ListenerThread`). After
`smfi_main` returns, callbacks in flight are waited for, and sessions libmilter abandoned (it
does not close parked connections at stop) get their `on_close` from Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _libmilter as c
from . import _libmilter_private as private
from . import _systemd
from ._affinity import confine
from ._errors import ConfigurationError, LibmilterError, SocketSpecError, WorkerStartError
from ._lifecycle import Gate, ListenerThread, notify_draining, rss_mib
from ._loop import EventLoopThread, call_hook
from ._options import RunOptions, stage_deadlines
from ._proctitle import set_title
from ._session import MilterSession
from ._signals import handled, wake_handler
from ._socketspec import SocketSpec, connects
from ._threadstate import release_exited_thread_states
from ._trampolines import LibmilterCallbacks, SyncEomProgress, Watchman
from ._whole import Spool

__all__ = ["DEFAULT_TIMEOUT", "STOP_GRACE", "Filter", "Server", "current"]

logger = logging.getLogger("pymilterkit")

STOP_GRACE = 10.0
"""Seconds a stop waits for stage methods still running before it closes their sessions."""

DRAIN_QUIET = 0.1
"""Seconds without a session or callback after which a drain is over."""

DEFAULT_TIMEOUT = 600
"""libmilter's I/O timeout unless `timeout` says otherwise: above Postfix's smtpd_timeout
(300 s), the longest an MTA pauses between commands, and far below libmilter's own 7210 s, so a
peer that stalls mid-packet frees its worker thread in minutes (docs/reliability.md)."""

_current: list[Server] = []


def current() -> Server | None:
    """This process's server once it is prepared (libmilter allows one per process)."""
    return _current[0] if _current else None


@dataclasses.dataclass(frozen=True)
class Filter:
    """What a serving process serves, and how: the same in every process of a run."""

    session_class: type[MilterSession]
    options: RunOptions
    spec: SocketSpec
    name: str
    metrics: bool
    debug_level: int

    def server(self, slot: int | None, cpus: set[int] | None) -> Server:
        """A `Server` for worker `slot` (None: the supervisor serving alone)."""
        return Server(self.session_class, self.options, self.spec, self.name,
                      metrics=self.metrics, debug_level=self.debug_level, slot=slot, cpus=cpus)


class Server:
    """libmilter serving `session_class` in this process (see the module docstring).

    `slot` is the worker's number under a supervisor that forked or spawned it (None: the
    supervisor serves itself); `cpus` the CPUs to confine this process to.
    """

    def __init__(
        self,
        session_class: type[MilterSession],
        options: RunOptions,
        spec: SocketSpec,
        name: str,
        *,
        metrics: bool,
        debug_level: int,
        slot: int | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.session_class = session_class
        self.options = options
        self.spec = spec
        self.name = name
        self.metrics = metrics
        self.debug_level = debug_level
        self.slot = slot
        self.cpus = cpus
        self.dispatcher: LibmilterCallbacks | None = None
        self.retiring = False
        """A worker past `max_sessions_per_worker`/`max_worker_rss`: it drains and exits."""
        self.handing_over = False
        """Serving alone, reloaded: the socket stays open for the workers that replace it."""
        self.on_serving: Callable[[], None] | None = None
        """Called once serving is about to begin (a worker's readiness to its supervisor)."""
        self.on_retiring: Callable[[str], None] | None = None
        """Called when this process begins to retire (its supervisor starts a successor)."""
        self.on_tick: Callable[[], None] | None = None
        """Called from the serving loop (a supervisor serving alone looks after its workers)."""
        self.closes_listener: Callable[[], None] | None = None
        """Refuses new connections at a stop (serving alone: nobody else would take them)."""
        self._lib: c.Libmilter | None = None
        self._loop: EventLoopThread | None = None
        self._progress: SyncEomProgress | None = None
        self._watchman: Watchman | None = None
        self._fatal: BaseException | None = None
        self._stop_requested = threading.Event()
        self._early: list[Callable[[], None]] = []  # requests that came before serving began
        self._attention = threading.Event()  # wakes the main thread's serving loop
        self._gate: Gate | None = None
        self._desc: c.SmfiDesc | None = None  # registered: mi_listener gets it too
        self._conn = b""
        self._timeout = DEFAULT_TIMEOUT
        self._thread: ListenerThread | None = None
        self._can_wake = False
        self._drain_deadline: float | None = None
        self._quiet_since: float | None = None

    # -- starting --------------------------------------------------------------------------

    def prepare(self, fd: int, inherited: bool, own_socket: Callable[[], None]) -> None:
        """Confine to the CPUs, register with libmilter and listen on `fd` (an `inherited`
        one is closed here: the supervisor keeps the shared socket), then run the class's
        `on_worker_start`. `own_socket()` is called if libmilter must open its own socket."""
        _current[:] = [self]
        if self.cpus is not None:
            confine(self.cpus)
            logger.info("running on CPU %s (cpu_affinity=%r)",
                        ",".join(map(str, sorted(self.cpus))), self.options.cpu_affinity)
        try:
            self._prepare(fd, inherited, own_socket)
        except BaseException:
            self._discard()
            raise

    def _prepare(self, fd: int, inherited: bool, own_socket: Callable[[], None]) -> None:
        lib = self._lib = c.load()
        options = self.options
        tcp = self.spec.kind in ("inet", "inet6")
        self.dispatcher = LibmilterCallbacks(
            self.session_class,
            lib,
            options.error_status,
            self._on_fatal,
            tcp=tcp,
            deadlines=stage_deadlines(options.stage_timeout),
            timeout_status=options.timeout_status,
            progress_interval=options.progress_interval,
            metrics=self.metrics,
            dry_run=options.dry_run,
            record=options.record,
        )
        self.dispatcher.spool = Spool(
            options.spool_threshold, options.spool_dir, options.max_message_size)
        desc = self._desc = self.dispatcher.descriptor(self.name.encode("utf-8", "surrogateescape"))
        if lib.smfi_register(desc) != c.MI_SUCCESS:
            raise LibmilterError("smfi_register failed")
        self._gate = Gate(fd)
        if inherited:
            os.close(fd)
        self._conn = f"fd:{self._gate.fd}".encode()
        if lib.smfi_setconn(self._conn) != c.MI_SUCCESS:
            raise SocketSpecError(f"libmilter refused socket spec {self._conn.decode()}")
        self._timeout = DEFAULT_TIMEOUT if options.timeout is None else options.timeout
        lib.smfi_settimeout(self._timeout)
        if options.backlog is not None and lib.smfi_setbacklog(options.backlog) != c.MI_SUCCESS:
            raise ConfigurationError(f"libmilter refused backlog {options.backlog}")
        lib.smfi_setdbg(self.debug_level)
        opened = lib.smfi_opensocket(0) == c.MI_SUCCESS
        if not opened and not inherited:
            self._discard()
            own_socket()
            if not tcp:
                raise SocketSpecError(
                    f"this libmilter does not accept an inherited socket (fd:N, a Debian "
                    f"patch), which pymilterkit needs to create {self.spec} safely"
                )
            # A libmilter without the fd:N spec: fall back to its own inet socket.
            logger.warning("libmilter does not accept fd:N; listening without TCP_NODELAY")
            lib.smfi_setconn(self.spec.libmilter().encode())
            opened = lib.smfi_opensocket(0) == c.MI_SUCCESS
        if not opened:
            raise SocketSpecError(f"could not listen on {self.spec}: {self._why_not_listening()}")
        # The filter's own start-up, as the user it runs as (privileges are dropped by now).
        self._start_worker()
        self.dispatcher.loop = self._loop
        spec = self.session_class.negotiation()
        interval = options.progress_interval
        if interval is not None and "on_eom" in spec.stages:  # async too: its first step
            self._progress = SyncEomProgress(self.dispatcher, interval)
        self._watchman = Watchman(self.dispatcher)

    @property
    def gated(self) -> bool:
        """Whether libmilter listens on our socket (else a reload cannot hand it over)."""
        return self._gate is not None

    def _needs_loop(self) -> bool:
        cls = self.session_class
        return bool(cls.negotiation().asynchronous) or any(
            inspect.iscoroutinefunction(getattr(cls, hook))
            for hook in ("on_worker_start", "on_worker_stop")
        )

    def _start_worker(self) -> None:
        """Start the event loop (if any stage or hook is async) and run the class's
        `on_worker_start`; a failure stops start-up (`WorkerStartError`)."""
        if self._needs_loop() and self._loop is None:
            self._loop = EventLoopThread()
        try:
            call_hook(self.session_class.on_worker_start(), self._run_on_loop)
        except BaseException as exc:
            self._stop_loop()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            logger.error(
                "%s.on_worker_start failed; not serving",
                self.session_class.__qualname__,
                exc_info=exc,
            )
            raise WorkerStartError(
                f"{self.session_class.__qualname__}.on_worker_start failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _stop_worker(self) -> None:
        """After the last session: the class's `on_worker_stop`, then the loop stops."""
        try:
            call_hook(self.session_class.on_worker_stop(), self._run_on_loop)
        except Exception:
            logger.exception("%s.on_worker_stop failed", self.session_class.__qualname__)
        finally:
            self._stop_loop()

    def _run_on_loop(self, coro: Any) -> Any:
        assert self._loop is not None, "an async hook needs the event loop"
        return self._loop.run(coro)

    def _stop_loop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def _why_not_listening(self) -> str:
        if self.spec.kind in ("inet", "inet6"):
            import socket

            probe = socket.socket(self.spec.family, socket.SOCK_STREAM)
            try:
                probe.bind(self.spec.connect_address())
            except OSError as exc:
                return str(exc)
            finally:
                probe.close()
        if self.spec.kind == "unix":
            directory = os.path.dirname(self.spec.path) or "."
            if not os.access(directory, os.W_OK):
                return f"no write permission in {directory}"
        return "libmilter could not create the socket (see syslog)"

    def _discard(self) -> None:
        """Close what `prepare` opened; libmilter never served on it."""
        if self._gate is not None:
            self._gate.discard()
            self._gate = None

    # -- serving ---------------------------------------------------------------------------

    def serve(self, signals: bool) -> None:
        """Serve until stopped; `signals`: handle the stop signals here (a worker; a
        supervisor serving alone handles them itself)."""
        lib = self._lib
        dispatcher = self.dispatcher
        assert lib is not None and dispatcher is not None
        result: list[int] = []
        attention = self._attention  # smfi_main returned, a limit was reached, a drain began
        thread = self._thread = ListenerThread(lambda: result.append(self._main(lib)), attention)
        if self.options.max_sessions_per_worker is not None:
            dispatcher.session_limit = self.options.max_sessions_per_worker
            dispatcher.past_limit = attention
        with wake_handler() as can_wake, handled(self) if signals else contextlib.nullcontext():
            self._can_wake = can_wake
            for request in self._early:
                request()
            if self.on_serving is not None:
                self.on_serving()
            thread.start()
            logger.info("%s listening on %s", self.name, self.spec)
            released = time.monotonic()
            while not thread.done.is_set():
                attention.wait(0.25 if self._drain_deadline is None else 0.02)
                attention.clear()
                if thread.done.is_set():
                    break
                self._tick()
                if self.on_tick is not None:
                    self.on_tick()
                self._notify()
                now = time.monotonic()
                if now - released >= 1.0:
                    released = now
                    self._release_thread_states()
        self._notify(stopping=not self.handing_over)
        if self._gate is not None:
            self._gate.forget()  # libmilter closed its descriptor at stop
            self._gate = None
        left = len(dispatcher.sessions)
        abandoned = dispatcher.close_all(STOP_GRACE)
        running = left - abandoned
        logger.info(
            "stopped: %d session(s) served, %d left open by libmilter: %d closed here%s",
            dispatcher.created,
            left,
            abandoned,
            f", {running} still running (not closed)" if running else "",
        )
        if abandoned:
            logger.debug("closed %d abandoned session(s)", abandoned)
        if self._progress is not None:
            self._progress.stop()
        if self._watchman is not None:
            self._watchman.stop()
        self._stop_worker()
        if self._fatal is not None:
            raise self._fatal
        if result and result[0] != c.MI_SUCCESS:
            if not self._stop_requested.is_set():
                raise LibmilterError(f"smfi_main failed ({result[0]}); see syslog")
            # A stop asked for while smfi_main was still starting makes it return MI_FAILURE:
            # the stop was ours, the run is clean.
            logger.debug("smfi_main returned %d after the stop was requested", result[0])

    def _main(self, lib: c.Libmilter) -> int:
        """libmilter's serving loop, on the listener thread: smfi_main without the signal
        thread that would stop it on a SIGHUP or SIGTERM the main thread could not take at once
        (`_libmilter_private.serve`)."""
        assert self._desc is not None
        backlog = self.options.backlog or 128
        return private.serve(lib, self._desc, self._conn, self.debug_level, self._timeout, backlog)

    def _tick(self) -> None:
        """Between waits of the main thread: end a finished drain, retire past a limit."""
        if self._stop_requested.is_set():
            return
        if self._drain_deadline is not None:
            if self._drained():
                logger.info("drained: every session has ended; stopping")
                self.stop()
            elif time.monotonic() >= self._drain_deadline:
                assert self.dispatcher is not None
                logger.warning(
                    "drain timeout (%g s): ending %d session(s) still open",
                    self.options.drain_timeout,
                    len(self.dispatcher.sessions),
                )
                self.stop()
            return
        if not self.retiring:
            reason = self._past_limit()
            if reason is not None:
                self.retire(reason)

    def _drained(self) -> bool:
        """No session, no callback and no accepted connection for `DRAIN_QUIET` seconds: a
        connection libmilter accepted just before the gate closed begins its session only when
        its thread runs, and a stop before that would refuse it."""
        assert self.dispatcher is not None
        now = time.monotonic()
        gate = self._gate
        if self.dispatcher.sessions or self.dispatcher.in_flight() or (
            gate is not None and gate.accepted()
        ):
            self._quiet_since = None
            return False
        if self._quiet_since is None:
            self._quiet_since = now
        return now - self._quiet_since >= DRAIN_QUIET

    def _past_limit(self) -> str | None:
        assert self.dispatcher is not None
        limit = self.options.max_sessions_per_worker
        if limit is not None and self.dispatcher.created >= limit:
            return f"{self.dispatcher.created} sessions (max_sessions_per_worker={limit})"
        most = self.options.max_worker_rss
        if most is not None:
            rss = rss_mib()
            if rss > most:
                return f"RSS {rss:.0f} MiB (max_worker_rss={most:g})"
        return None

    def retire(self, reason: str) -> None:
        """Past a limit, or told to (SIGHUP to a worker): a successor takes this process's
        place. A worker drains at once; serving alone, the supervisor reloads."""
        self.retiring = True
        if self.slot is None:
            logger.info("retiring: %s; a fresh worker takes over", reason)
        else:
            logger.info("worker %d retires: %s", os.getpid(), reason)
        if self.on_retiring is not None:
            self.on_retiring(reason)
        if self.slot is not None:
            self.drain("retiring")

    def hand_over(self) -> None:
        """Serving alone, reloaded: drain, leaving the socket to the new workers."""
        self.handing_over = True
        self.drain("reloaded")

    def drain(self, reason: str) -> None:
        """Take no new connections; stop once the sessions in flight ended (`drain_timeout`)."""
        if self.later(lambda: self.drain(reason)):
            return
        if self._drain_deadline is not None or self._stop_requested.is_set():
            return
        dispatcher = self.dispatcher
        assert dispatcher is not None
        set_title("drain", self.name)
        self._drain_deadline = time.monotonic() + self.options.drain_timeout
        self._attention.set()  # the serving loop checks the drain at once
        if self._gate is not None:
            self._gate.close()
            self._wake()  # a poll still on the real socket moves to the gate at once
            if self.closes_listener is not None and not self.handing_over:
                self.closes_listener()
        else:  # libmilter opened its own socket: refuse new sessions instead
            dispatcher.stopping = True
        if not self.handing_over:
            notify_draining(stopping=not self.retiring and self.slot is None)
        logger.info(
            "%s: draining %d session(s), for up to %g s",
            reason,
            len(dispatcher.sessions),
            self.options.drain_timeout,
        )

    def later(self, request: Callable[[], None]) -> bool:
        """Keep `request` for when serving begins, if it has not (True: kept)."""
        if self._thread is not None:
            return False
        self._early.append(request)
        return True

    def stop_now(self, reason: str) -> None:
        """A second stop signal: stop without waiting for the drain."""
        if self.later(lambda: self.stop_now(reason)):
            return
        logger.info("%s again: stopping at once", reason)
        self.stop()

    def reload(self, reason: str) -> None:
        """SIGHUP to a worker: a fresh one replaces it."""
        if self.later(lambda: self.reload(reason)):
            return
        if not self.retiring:
            self.retire(reason)

    def _wake(self) -> None:
        thread = self._thread
        if thread is not None and self._can_wake:
            thread.wake()

    def _notify(self, stopping: bool = False) -> None:
        """Tell systemd how the run goes (nothing without NOTIFY_SOCKET); a worker tells its
        supervisor instead."""
        assert self.dispatcher is not None
        open_, served = len(self.dispatcher.sessions), self.dispatcher.created
        if self.slot is not None:
            _systemd.notifier().worker_tick(self.slot, open_, served)
            return
        stopping = stopping or (self._stop_requested.is_set() and not self.handing_over)
        _systemd.notifier().tick(str(self.spec), open_, served, stopping=stopping)

    @staticmethod
    def _release_thread_states() -> None:
        released = release_exited_thread_states()
        if released:
            logger.debug("released %d thread state(s) of ended libmilter workers", released)

    # -- stopping --------------------------------------------------------------------------

    def _on_fatal(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self.stop()

    def stop(self) -> None:
        """Stop now; returns at once (smfi_stop runs on a helper thread)."""
        if self._stop_requested.is_set():
            return
        self._stop_requested.set()
        if self.dispatcher is not None:
            self.dispatcher.stopping = True  # no session is created after a stop begins
        lib = self._lib
        if lib is None:
            return
        threading.Thread(
            target=self._stop_now, args=(lib,), name="libmilter-stop", daemon=True
        ).start()

    def _stop_now(self, lib: c.Libmilter) -> None:
        if self.dispatcher is not None and self.dispatcher.loop is not None:
            cancelled = self.dispatcher.end_pending(grace=2.0)
            if cancelled:
                logger.warning("stop: %d async stage(s) still running were cancelled", cancelled)
        waker = threading.Thread(target=self._wake_listener, daemon=True)
        waker.start()
        lib.smfi_stop()

    def _wake_listener(self, limit: float = 15.0) -> None:
        # Wake the listener until smfi_main is back: a wake can land just before its poll.
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + limit
        while not thread.done.wait(0.02) and time.monotonic() < deadline:
            if not (self._can_wake and thread.wake()) and (self._gate is None
                                                          or self._gate.open):
                connects(self.spec)  # run() off the main thread: no wake signal handler

