"""The runner: registers a session class with libmilter and serves until shutdown.

Theory of operation
-------------------
libmilter allows one `smfi_main` per process (a stop is sticky), so a process runs one milter.
`smfi_main` runs on a dedicated thread: it blocks SIGTERM/SIGINT/SIGHUP in its own thread and
starts a sigwait thread, while the main thread keeps Python's signal handling and turns those
signals into a drain, a stop or a reload (`_lifecycle.StopRequests`). `smfi_stop` waits for
libmilter's listener, which polls for up to 5 s holding a lock; it is called from a helper thread
while the listener thread is woken from its poll by a signal (`_lifecycle.ListenerThread`).

A drain (SIGTERM/SIGINT) closes libmilter's listening descriptor to new connections
(`_lifecycle.Gate`), lets the sessions in flight finish, up to `drain_timeout`, then stops.
When `smfi_main` returns, callbacks still in flight are waited for, and sessions libmilter
abandoned (its worker pool does not call xxfi_close for parked connections at stop) get their
`on_close` from Python, each after its running stage returned, so no session outlives the run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pickle
import signal
import socket as socketlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec

from . import _libmilter as c
from . import _metrics, _systemd
from ._affinity import CpuAffinity, confine, plan
from ._config import install as install_config
from ._errors import ConfigurationError, LibmilterError, SocketSpecError, WorkerStartError
from ._flags import Status
from ._instrument import callbacks_class
from ._lifecycle import (
    Gate,
    ListenerThread,
    StopRequests,
    notify_draining,
    notify_ready,
    notify_reloading,
    rss_mib,
    wake_handler,
)
from ._limits import raise_nofile_limit
from ._listen import Listener, open_listener, poke
from ._loop import EventLoopThread, call_hook
from ._options import DEFAULT_DRAIN_TIMEOUT, ErrorStatus, RunOptions
from ._security import check_can_drop_privileges, drop_privileges
from ._session import MilterSession
from ._signals import on_stop_signals
from ._socketspec import SocketSpec, parse_socket_spec
from ._threadstate import release_exited_thread_states
from ._trampolines import LibmilterCallbacks, SyncEomProgress

__all__ = ["Milter", "libmilter_version", "run", "set_debug_level", "shutdown"]

logger = logging.getLogger("pymilterkit")
_P = ParamSpec("_P")

STOP_GRACE = 10.0
"""Seconds a stop waits for stage methods still running before it closes their sessions."""

DEFAULT_TIMEOUT = 600
"""libmilter's I/O timeout unless `timeout` says otherwise: above Postfix's smtpd_timeout
(300 s), the longest an MTA pauses between commands, and far below libmilter's own 7210 s, so a
peer that stalls mid-packet frees its worker thread in minutes (docs/reliability.md)."""

_state_lock = threading.Lock()
_has_run = False
_current: Milter | None = None
_default_debug_level = 0


class Milter:
    """Runs a `MilterSession` subclass on libmilter: `Milter(MyFilter, "unix:/run/f.sock").run()`.

    `timeout` is libmilter's per-read/write timeout in seconds (default 600, not libmilter's
    7210: a stalled peer holds a worker thread that long), `backlog` the
    listen backlog, `debug_level` libmilter's trace level (0-6), `error_status` the answer when
    a stage method raises, `workers` the number of pre-forked processes (1: this process).
    `socket_mode` (default 0o660: owner and group) and `socket_group` set a unix socket's
    permissions so only the MTA's user can connect; `user`/`group` drop privileges once the
    socket is open. `cpu_affinity` ("auto": each process on one CPU, which spares the GIL
    cross-CPU hand-overs between libmilter's threads; None: the scheduler decides; or a list of
    CPUs) is applied when `run()` starts. `config` is an instance of the dataclass the class
    declares as `config` (docs/guides/operations.md): it is set on the class at once.
    `metrics="HOST:PORT"` serves `/metrics` and `/healthz` there (extra `pymilterkit[metrics]`);
    `dry_run` runs the filter but sends the MTA CONTINUE and no modification, logging what it
    would have done.

    Slow work: `stage_timeout` (seconds, None: no limit) cancels an `async def` stage that
    runs longer and answers `timeout_status`; a sync stage past it is logged. While on_eom
    runs longer than `progress_interval` seconds (None: never), the MTA is sent progress at
    that interval, so its timeout does not fire. Keep `stage_timeout` below the MTA's
    (Postfix: milter_command_timeout 30 s, milter_content_timeout 300 s for on_eom).

    Lifecycle (docs/lifecycle.md): `drain_timeout` is how long SIGTERM lets the sessions in
    flight finish; `max_sessions_per_worker` and `max_worker_rss` (MiB) retire a worker past
    either limit (it drains, a fresh one takes its place).
    """

    def __init__(
        self,
        session_class: type[MilterSession],
        socket: str,
        *,
        name: str | None = None,
        timeout: int | None = None,
        backlog: int | None = None,
        debug_level: int = 0,
        error_status: ErrorStatus = Status.TEMPFAIL,
        workers: int = 1,
        socket_mode: int | None = None,
        socket_group: str | int | None = None,
        user: str | int | None = None,
        group: str | int | None = None,
        cpu_affinity: CpuAffinity = "auto",
        config: object | None = None,
        metrics: str | None = None,
        dry_run: bool = False,
        stage_timeout: float | None = None,
        timeout_status: ErrorStatus = Status.TEMPFAIL,
        progress_interval: float | None = 10.0,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_sessions_per_worker: int | None = None,
        max_worker_rss: float | None = None,
    ) -> None:
        if not (isinstance(session_class, type) and issubclass(session_class, MilterSession)):
            raise ConfigurationError(
                f"session_class must be a MilterSession subclass, got {session_class!r}"
            )
        try:
            inspect.signature(session_class).bind()
        except TypeError:
            raise ConfigurationError(
                f"{session_class.__qualname__} must be constructible without arguments: the "
                f"runner creates one instance per connection"
            ) from None
        except ValueError:  # no signature available (C-implemented __init__): assume fine
            pass
        self.options = RunOptions(
            socket, name=name, timeout=timeout, backlog=backlog, debug_level=debug_level,
            error_status=error_status, workers=workers, socket_mode=socket_mode,
            socket_group=socket_group, user=user, group=group, cpu_affinity=cpu_affinity,
            config=config, metrics=metrics, dry_run=dry_run, stage_timeout=stage_timeout,
            timeout_status=timeout_status, progress_interval=progress_interval,
            drain_timeout=drain_timeout, max_sessions_per_worker=max_sessions_per_worker,
            max_worker_rss=max_worker_rss,
        )
        install_config(session_class, config)  # visible to the class before any fork
        self.session_class = session_class
        self.spec: SocketSpec = parse_socket_spec(socket)
        self.name = name or session_class.__name__
        self.cli_argv: list[str] | None = None
        """The `pymilterkit` command line this run came from: a reload parses it again (and
        reads its config file again)."""
        self.metrics = None if metrics is None else _metrics.parse_address(metrics)
        self._cpu_plan: list[set[int]] | None = None
        self._loop: EventLoopThread | None = None
        self._progress: SyncEomProgress | None = None
        self._fatal: BaseException | None = None
        self._stop_requested = threading.Event()
        self._lib: c.Libmilter | None = None
        self.dispatcher: LibmilterCallbacks | None = None
        self._listener: Listener | None = None
        self._inherited = False
        self._activated: Listener | None = None  # the socket systemd passed (spec "systemd")
        self._slot: int | None = None  # the pre-forked worker this process is
        self._early: list[signal.Signals] = []  # signals that came before serving began
        self._attention = threading.Event()  # wakes the main thread's serving loop
        self._gate: Gate | None = None
        self._thread: ListenerThread | None = None
        self._can_wake = False
        self._requests = StopRequests()
        self._drain_deadline: float | None = None
        self._idle_ticks = 0
        self.retiring = False
        """A worker past `max_sessions_per_worker`/`max_worker_rss`: it drains and exits."""
        self.handing_over = False
        """A single process reloading: its socket passes to the worker that replaces it."""
        self._successor: int | None = None  # single-process reload: the fresh worker
        self._control: tuple[int, int] | None = None
        self._reload_started = 0.0
        self.on_serving: Callable[[], None] | None = None
        """Called once serving is about to begin (the supervisor's worker readiness)."""
        self.on_retiring: Callable[[str], None] | None = None
        """Called when a worker begins to retire (the supervisor starts its successor)."""

    # -- running ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (after a drain) or `shutdown()`; SIGHUP reloads.
        Raises `MilterError` on failure.

        libmilter allows this once per process: a second call raises `ConfigurationError`.
        """
        claim_run(self)
        raise_nofile_limit()  # one descriptor per MTA connection: allow what the admin allows
        service = _systemd.notifier()  # takes NOTIFY_SOCKET & co. out of the environment
        if self.spec.kind == "systemd":  # from here on, the passed socket's unix/inet address
            self._activated, self.spec = _systemd.take_listener(self.spec)
        self._plan_cpus()
        stop_metrics = _metrics.nothing
        if self.metrics is not None:  # only then is prometheus_client imported
            from ._metrics_http import start as start_metrics

            stop_metrics = start_metrics(
                self.metrics, self.session_class, self.options.workers, dry_run=self.options.dry_run
            )
        try:
            if self.options.workers > 1:
                from ._prefork import run_prefork

                service.for_workers(self.options.workers)
                run_prefork(
                    self.options.workers,
                    open_socket=self._open_socket,
                    serve=self._serve_worker,
                    name=self.name,
                    where=str(self.spec),
                    tick=lambda slots, stopping: service.tick(
                        str(self.spec), workers=slots, stopping=stopping
                    ),
                    spawn_fresh=self._spawn_fresh,
                    drain_timeout=self.options.drain_timeout,
                )
                return
            self._confine_to_cpus()
            try:
                # A signal while the socket is being opened is kept for `_serve`: the run
                # still ends in order, and leaves no socket file behind.
                with on_stop_signals(self._early.append):
                    self._prepare()
            except BaseException:
                self._discard()  # a run refused before serving leaves no socket file
                raise
            self._serve()
            if self._successor is not None:
                self._supervise_successor()
        finally:
            stop_metrics()

    def _plan_cpus(self) -> None:
        """Choose the CPUs of this process, or of each worker (`cpu_affinity`), before forking."""
        workers = self.options.workers
        self._cpu_plan = plan(self.options.cpu_affinity, workers if workers > 1 else None)

    def _confine_to_cpus(self, slot: int = 0) -> None:
        """Confine this process (worker `slot`) as planned, before libmilter starts threads."""
        if self._cpu_plan is not None:
            cpus = self._cpu_plan[slot]
            confine(cpus)
            logger.info("running on CPU %s (cpu_affinity=%r)", ",".join(map(str, sorted(cpus))),
                        self.options.cpu_affinity)

    def _serve_worker(self, fd: int, slot: int, control: int) -> None:
        """Serve as pre-forked worker `slot` on the parent's listening socket, until stopped;
        report to the supervisor on `control`."""
        from ._prefork import READY, RETIRING, notify_supervisor

        self.on_serving = lambda: notify_supervisor(control, READY)
        self.on_retiring = lambda reason: notify_supervisor(control, RETIRING)
        self._confine_to_cpus(slot)
        self._inherited = True
        self._slot = slot
        try:
            self._prepare(inherited_fd=fd)
        except BaseException:
            self._discard()
            raise
        self._serve()

    def _spawn_fresh(self, fd: int, slot: int, control: int) -> int:
        """Start worker `slot` as a fresh interpreter that imports the filter anew (reload)."""
        from . import _fresh

        description: dict[str, Any] = {
            "fd": fd,
            "slot": slot,
            "control": control,
            "parent": os.getpid(),
            "path": sys.path,
            "cwd": os.getcwd(),
            "log_level": logging.getLogger("pymilterkit").getEffectiveLevel(),
        }
        description["metrics"] = _metrics.fresh_worker()  # None without metrics
        if self.cli_argv is not None:  # parse the command line (and its config file) again
            description["argv"] = self.cli_argv
        else:
            description["target"] = _fresh.class_target(self.session_class)
            try:
                description["options"] = pickle.dumps(self.options).hex()
            except Exception as exc:
                raise OSError(f"the run's options cannot be passed on: {exc}") from exc
        return _fresh.spawn(description)

    def _open_socket(self) -> Listener:
        """Open the listening socket, then drop privileges: once per run, in the process that
        owns the socket (this one, or the worker supervisor).

        Ours, handed to libmilter as fd:N (Debian's libmilter): TCP gets TCP_NODELAY, a unix
        socket its mode and group before it appears at its path.
        """
        o = self.options
        check_can_drop_privileges(o.user, o.group)
        listener = self._activated or open_listener(
            self.spec, o.backlog, o.socket_mode, o.socket_group, owner=o.user
        )
        self._activated = None
        try:
            drop_privileges(o.user, o.group)
        except BaseException:
            listener.close()
            raise
        return listener

    def _prepare(self, inherited_fd: int | None = None) -> None:
        """Register with libmilter and open the listening socket."""
        lib = self._lib = c.load()
        tcp = self.spec.kind in ("inet", "inet6")
        callbacks = callbacks_class(metrics=self.metrics is not None, dry_run=self.options.dry_run)
        self.dispatcher = callbacks(
            self.session_class,
            lib,
            self.options.error_status,
            self._on_fatal,
            tcp=tcp,
            stage_timeout=self.options.stage_timeout,
            timeout_status=self.options.timeout_status,
            progress_interval=self.options.progress_interval,
        )
        desc = self.dispatcher.descriptor(self.name.encode("utf-8", "surrogateescape"))
        if lib.smfi_register(desc) != c.MI_SUCCESS:
            raise LibmilterError("smfi_register failed")
        if inherited_fd is None:
            self._listener = self._open_socket()
            self._gate = Gate(self._listener.fileno())
        else:
            self._gate = Gate(inherited_fd)
            os.close(inherited_fd)  # the supervisor keeps the shared socket
        conn = f"fd:{self._gate.fd}"
        if lib.smfi_setconn(conn.encode()) != c.MI_SUCCESS:
            raise SocketSpecError(f"libmilter refused socket spec {conn}")
        timeout, backlog = self.options.timeout, self.options.backlog
        lib.smfi_settimeout(DEFAULT_TIMEOUT if timeout is None else timeout)
        if backlog is not None and lib.smfi_setbacklog(backlog) != c.MI_SUCCESS:
            raise ConfigurationError(f"libmilter refused backlog {backlog}")
        lib.smfi_setdbg(self.options.debug_level or _default_debug_level)
        opened = lib.smfi_opensocket(0) == c.MI_SUCCESS
        if not opened and self._listener is not None:
            self._discard()
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
            raise SocketSpecError(
                f"could not listen on {self.spec}: {self._why_not_listening()}"
            )
        # The filter's own start-up, as the user it runs as (privileges are dropped by now).
        self._start_worker()
        self.dispatcher.loop = self._loop
        spec = self.session_class.negotiation()
        if (
            self.options.progress_interval is not None
            and "on_eom" in spec.stages
            and "on_eom" not in spec.asynchronous
        ):
            self._progress = SyncEomProgress(self.dispatcher, self.options.progress_interval)

    def _needs_loop(self) -> bool:
        cls = self.session_class
        return bool(cls.negotiation().asynchronous) or any(
            inspect.iscoroutinefunction(getattr(cls, hook))
            for hook in ("on_worker_start", "on_worker_stop")
        )

    def _start_worker(self) -> None:
        """In the serving process: start the event loop (if any stage or hook is async) and
        run the class's `on_worker_start`; a failure stops start-up (`WorkerStartError`)."""
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
            probe = socketlib.socket(self.spec.family, socketlib.SOCK_STREAM)
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
        """Close what `_prepare` opened; libmilter never served on it."""
        if self._gate is not None:
            self._gate.discard()
            self._gate = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _serve(self) -> None:
        lib = self._lib
        dispatcher = self.dispatcher
        assert lib is not None and dispatcher is not None
        result: list[int] = []
        attention = self._attention  # smfi_main returned, a limit was reached, a drain began
        thread = self._thread = ListenerThread(lambda: result.append(lib.smfi_main()), attention)
        if self.options.max_sessions_per_worker is not None:
            dispatcher.session_limit = self.options.max_sessions_per_worker
            dispatcher.past_limit = attention
        with on_stop_signals(self._on_signal), wake_handler() as can_wake:
            self._can_wake = can_wake
            for signum in self._early:
                self._on_signal(signum)
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
                self._notify()
                now = time.monotonic()
                if now - released >= 1.0:
                    released = now
                    self._release_thread_states()
        self._notify(stopping=True)
        if self._gate is not None:
            self._gate.forget()  # libmilter closed its descriptor at stop
            self._gate = None
        left = len(dispatcher.sessions)
        abandoned = dispatcher.close_all(STOP_GRACE)
        logger.info(
            "stopped: %d session(s) served, %d left open by libmilter and closed here",
            dispatcher.created,
            left,
        )
        if abandoned:
            logger.debug("closed %d abandoned session(s)", abandoned)
        if self._progress is not None:
            self._progress.stop()
        self._stop_worker()
        if self._successor is None:  # else the socket passes to the supervisor (reload)
            self._remove_socket_file()
        if self._fatal is not None:
            raise self._fatal
        if result and result[0] != c.MI_SUCCESS:
            raise LibmilterError(f"smfi_main failed ({result[0]}); see syslog")

    def _tick(self) -> None:
        """Between waits of the main thread: end a finished drain, retire a worker past a limit."""
        if self._successor is not None and not self.handing_over:
            self._check_successor()
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
        if not self.retiring and self._successor is None:
            reason = self._past_limit()
            if reason is None:
                pass
            elif self._inherited:
                self.retire(reason)
            else:  # a single process: hand over to a fresh worker, as a reload does
                self.retiring = True
                logger.info("retiring: %s; a fresh worker takes over", reason)
                self.reload()

    def _drained(self) -> bool:
        """No session and no callback, twice in a row (a connection libmilter accepted just
        before the gate closed shows up at its negotiate a moment later)."""
        assert self.dispatcher is not None
        if self.dispatcher.sessions or self.dispatcher.in_flight():
            self._idle_ticks = 0
            return False
        self._idle_ticks += 1
        return self._idle_ticks >= 3

    def _past_limit(self) -> str | None:
        assert self.dispatcher is not None
        limit = self.options.max_sessions_per_worker
        if limit is not None and self.dispatcher.created >= limit:
            return f"{self.dispatcher.created} sessions (max_sessions_per_worker={limit})"
        if self.options.max_worker_rss is not None:
            rss = rss_mib()
            if rss > self.options.max_worker_rss:
                return f"RSS {rss:.0f} MiB (max_worker_rss={self.options.max_worker_rss:g})"
        return None

    def retire(self, reason: str) -> None:
        """Drain this worker and exit, so that a fresh one takes its place."""
        self.retiring = True
        logger.info("worker %d retires: %s", os.getpid(), reason)
        if self.on_retiring is not None:
            self.on_retiring(reason)
        self.drain("retiring")

    def drain(self, reason: str) -> None:
        """Take no new connections; stop once the sessions in flight ended (`drain_timeout`)."""
        if self._drain_deadline is not None or self._stop_requested.is_set():
            return
        dispatcher = self.dispatcher
        assert dispatcher is not None
        self._drain_deadline = time.monotonic() + self.options.drain_timeout
        self._attention.set()  # the serving loop checks the drain at once
        if self._gate is not None:
            self._gate.close()
            self._wake()  # a poll still on the real socket moves to the gate at once
            if self._listener is not None and self._successor is None:
                # Single process: refuse new connections rather than queue them for no one.
                self._listener.sock.close()
        else:  # libmilter opened its own socket: refuse new sessions instead
            dispatcher.stopping = True
        if not self.handing_over:
            notify_draining(stopping=not self.retiring and not self._inherited)
        logger.info(
            "%s: draining %d session(s), for up to %g s",
            reason,
            len(dispatcher.sessions),
            self.options.drain_timeout,
        )

    def _wake(self) -> None:
        thread = self._thread
        if thread is not None and self._can_wake:
            thread.wake()

    def _notify(self, stopping: bool = False) -> None:
        """Tell systemd how the run goes (nothing without NOTIFY_SOCKET); a pre-forked worker
        tells its supervisor instead."""
        assert self.dispatcher is not None
        open_, served = len(self.dispatcher.sessions), self.dispatcher.created
        if self._slot is not None:
            _systemd.notifier().worker_tick(self._slot, open_, served)
            return
        stopping = stopping or self._stop_requested.is_set()
        _systemd.notifier().tick(str(self.spec), open_, served, stopping=stopping)

    @staticmethod
    def _release_thread_states() -> None:
        released = release_exited_thread_states()
        if released:
            logger.debug("released %d thread state(s) of ended libmilter workers", released)

    def _remove_socket_file(self) -> None:
        # The socket is ours (fd:N): libmilter neither created nor removes it. A pre-forked
        # worker leaves the shared socket to its parent.
        if self._listener is not None:
            self._listener.close()  # libmilter closed only its own duplicate (the gate)
            self._listener = None

    def _on_signal(self, signum: signal.Signals) -> None:
        request = self._requests.classify(signum)
        if request is None:
            return
        if request != "reload" and self._successor is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._successor, signal.SIGTERM)  # the stop is for it too
        if request == "now":
            logger.info("signal %s again: stopping at once", signum.name)
            self.stop()
        elif request == "drain":
            self.drain(f"signal {signum.name}")
        elif self._inherited:  # SIGHUP to a worker: replace it by a fresh one
            self.retire(f"signal {signum.name}")
        else:
            self.reload()

    def reload(self) -> None:
        """SIGHUP in a single process: a fresh worker process takes the socket; once it serves,
        this process drains and then supervises it (as with `workers`, docs/lifecycle.md)."""
        from ._prefork import control_pipe

        if self._listener is None or self._gate is None:
            logger.warning("SIGHUP: libmilter opened the socket itself; cannot reload")
            return
        if self._successor is not None or self._drain_deadline is not None:
            logger.warning("SIGHUP: a reload or stop is already under way")
            return
        control = control_pipe()
        fd = self._listener.fileno()
        os.set_inheritable(fd, True)
        try:
            pid = self._spawn_fresh(fd, 0, control[1])
        except OSError as exc:
            for end in control:
                os.close(end)
            logger.error("reload failed: could not start a worker: %s", exc)
            return
        finally:
            os.set_inheritable(fd, False)
        self._successor, self._control = pid, control
        self._reload_started = time.monotonic()
        notify_reloading()
        logger.info("SIGHUP: reloading: fresh worker %d starts", pid)

    def _check_successor(self) -> None:
        from ._prefork import READY, READY_TIMEOUT, read_reports

        pid, control = self._successor, self._control
        assert pid is not None and control is not None
        if (READY, pid) in read_reports(control[0]):
            self.handing_over = True
            notify_ready()
            logger.info(
                "reloaded in %.2f s: worker %d serves; this process drains, then supervises",
                time.monotonic() - self._reload_started,
                pid,
            )
            self.drain("reloaded")
            return
        why = None
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            why = f"the new worker exited with {os.waitstatus_to_exitcode(status)} before serving"
        elif time.monotonic() - self._reload_started > READY_TIMEOUT:
            why = f"the new worker did not serve within {READY_TIMEOUT:g} s"
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if why is not None:
            logger.error("reload failed: %s (see above); this process keeps serving", why)
            notify_ready()
            for end in control:
                os.close(end)
            self._successor = self._control = None

    def _supervise_successor(self) -> None:
        """After a single process's reload: supervise the worker that took its socket."""
        from ._prefork import Supervisor

        pid, control, listener = self._successor, self._control, self._listener
        assert pid is not None and control is not None and listener is not None
        self._listener = None
        supervisor = Supervisor(
            1, self._serve_worker, self._spawn_fresh, self.name, str(self.spec),
            self.options.drain_timeout,
        )
        supervisor.adopt(listener, control, pid, stop=not self.handing_over
                         or self._requests.draining)

    def _on_fatal(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self.stop()

    def stop(self) -> None:
        """Ask the milter to stop now; returns at once (smfi_stop runs on a helper thread)."""
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
                poke(self.spec)  # run() off the main thread: no wake signal handler


def claim_run(milter: Milter) -> None:
    """Make `milter` this process's one run (libmilter allows one), or raise."""
    global _has_run, _current
    with _state_lock:
        if _has_run:
            raise ConfigurationError(
                "libmilter allows one milter run per process and this process already ran "
                "one; start a new process (e.g. multiprocessing or subprocess)"
            )
        _has_run = True
        _current = milter


def _shorthand(_: Callable[_P, Milter]) -> Callable[[Callable[..., None]], Callable[_P, None]]:
    """Give the decorated function the signature of `Milter` (its keywords stay said once)."""
    return lambda function: function


@_shorthand(Milter)
def run(*args: Any, **options: Any) -> None:
    """Shorthand for `Milter(session_class, socket, **options).run()`."""
    Milter(*args, **options).run()


def shutdown() -> None:
    """Ask the running milter to stop (smfi_stop); safe from any thread and from a callback."""
    current = _current
    if current is not None:
        current.stop()


def libmilter_version() -> tuple[int, int, int]:
    """`(major, minor, patch)` of the loaded libmilter (smfi_version)."""
    return c.version()


def set_debug_level(level: int) -> None:
    """Set libmilter's trace level (smfi_setdbg) for the run; `Milter(debug_level=N)` wins.

    libmilter reads the level when `run()` starts, so call this before.
    """
    global _default_debug_level
    if not isinstance(level, int) or level < 0:
        raise ConfigurationError(f"debug level must be an int >= 0: {level!r}")
    _default_debug_level = level
    c.load().smfi_setdbg(level)
