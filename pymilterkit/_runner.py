"""The run: `Milter` (a thin facade over the run's options), `run`, `shutdown`, and the
`Supervisor` that owns every run. It opens the listening socket once and keeps it for the whole
run; with `workers=1` it serves on it itself (a `_serve.Server` in this process), with N it forks
N workers (each a `Server`) and replaces one that dies. Both are one design: SIGTERM/SIGINT
drain, SIGHUP reloads through fresh interpreters (`_fresh`), a worker past its limits retires
and is replaced at once (docs/lifecycle.md). Workers report over a pipe (`READY`, `RETIRING` +
pid); connections that arrive while no worker listens wait in the socket's queue.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec

from . import _libmilter as c
from . import _metrics, _systemd
from ._affinity import CpuAffinity, plan
from ._config import install as install_config
from ._errors import ConfigurationError, LibmilterError, WorkerStartError
from ._flags import Status
from ._fresh import Recipe
from ._libmilter import prctl
from ._lifecycle import notify_draining
from ._limits import raise_nofile_limit
from ._listen import Listener, open_listener
from ._options import (
    DEFAULT_DRAIN_TIMEOUT,
    ErrorStatus,
    RunOptions,
    StageTimeout,
    parse_address,
    spool_problem,
)
from ._proctitle import role, set_title
from ._record import RecordOptions
from ._security import check_can_drop_privileges, drop_privileges, unreadable
from ._serve import Filter, Server
from ._serve import current as current_server
from ._session import MilterSession
from ._signals import RETIRE_SIGNAL, fork, handled
from ._socketspec import SocketSpec, parse_socket_spec

__all__ = [
    "READY",
    "RETIRING",
    "Milter",
    "Supervisor",
    "libmilter_version",
    "plan_cpus",
    "run",
    "serve_worker",
    "set_debug_level",
    "shutdown",
]

logger = logging.getLogger("pymilterkit")
_P = ParamSpec("_P")

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
    would have done. `record=RecordOptions(DIR)` writes what the filter saw and did, one file
    per connection (docs/guides/record-replay.md).

    Slow work: `stage_timeout` is each stage's deadline: seconds for every stage, or per stage
    (`{"default": 10, "eom": 60}`, keys the method names without `on_`; 0: none); None keeps
    the defaults, which are what Postfix waits (30 s; header, eoh, body 300 s; eom 600 s). An
    `async def` stage past it is cancelled and answered `timeout_status`; a sync one is logged
    and counted when its deadline passes. While on_eom runs longer than `progress_interval`
    seconds (None: never), the MTA is sent progress at that interval, so its timeout does not
    fire. To answer before the MTA gives up, set deadlines below its timeouts (Postfix:
    milter_command_timeout 30 s, milter_content_timeout 300 s; Sendmail: 10 s for a reply).

    Lifecycle (docs/lifecycle.md): `drain_timeout` is how long SIGTERM lets the sessions in
    flight finish; `max_sessions_per_worker` and `max_worker_rss` (MiB) retire a worker past
    either limit (it drains, a fresh one takes its place).

    Whole-message filters (`on_message`): a message is held in memory up to `spool_threshold`
    bytes, then in a private temporary file in `spool_dir`; `max_message_size` overrides the
    class's limit.
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
        stage_timeout: StageTimeout = None,
        timeout_status: ErrorStatus = Status.TEMPFAIL,
        progress_interval: float | None = 10.0,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_sessions_per_worker: int | None = None,
        max_worker_rss: float | None = None,
        record: RecordOptions | None = None,
        spool_threshold: int = 1024 * 1024,
        spool_dir: str | None = None,
        max_message_size: int | None = None,
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
            max_worker_rss=max_worker_rss, record=record, spool_threshold=spool_threshold,
            spool_dir=spool_dir, max_message_size=max_message_size,
        )
        install_config(session_class, config)  # visible to the class before any fork
        self.session_class = session_class
        self.spec: SocketSpec = parse_socket_spec(socket)
        self.name = name or session_class.__name__
        self.cli_argv: list[str] | None = None
        """The `pymilterkit` command line this run came from: a reload parses it again (and
        reads its config file again)."""
        self.metrics = None if metrics is None else parse_address(metrics)

    def filter(self) -> Filter:
        """What every serving process of this run serves, and how."""
        return Filter(
            self.session_class, self.options, self.spec, self.name,
            metrics=self.metrics is not None,
            debug_level=self.options.debug_level or _default_debug_level,
        )

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (after a drain) or `shutdown()`; SIGHUP reloads.
        Raises `MilterError` on failure.

        libmilter allows this once per process: a second call raises `ConfigurationError`.
        """
        claim_run(self)
        raise_nofile_limit()  # one descriptor per MTA connection: allow what the admin allows
        _systemd.notifier()  # takes NOTIFY_SOCKET & co. out of the environment
        activated = None
        if self.spec.kind == "systemd":  # from here on, the passed socket's unix/inet address
            activated, self.spec = _systemd.take_listener(self.spec)
        stop_metrics: Callable[[], None] | None = None
        if self.metrics is not None:  # only then is prometheus_client imported
            from ._metrics_http import start as start_metrics

            stop_metrics = start_metrics(
                self.metrics, self.session_class, self.options.workers,
                dry_run=self.options.dry_run,
            )
        try:
            recipe = Recipe(self.session_class, self.options, self.cli_argv)
            Supervisor(self.filter(), recipe, activated).run()
        finally:
            if stop_metrics is not None:
                stop_metrics()

    def stop(self) -> None:
        """Ask the milter to stop now; returns at once (smfi_stop runs on a helper thread)."""
        server = current_server()
        if server is not None:
            server.stop()


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


# -- the supervisor ------------------------------------------------------------------------------

_RESPAWN_WINDOW = 10.0
_START_FAILED = 3  # a worker's exit code when the filter's on_worker_start failed
_STOP_MARGIN = 10.0
"""Seconds past the drain timeout after which workers still running are killed."""
READY_TIMEOUT = 60.0
"""Seconds a reload waits for its new workers to serve before it gives up."""

READY = b"S"
RETIRING = b"R"
DRAINS = b"T"
"""Written with a worker's READY, just before it: its drain timeout in ms (a reload's fresh
workers read it from the config file again). A supervisor that does not know it skips it."""
_MESSAGE = struct.Struct("<ci")


def _die_with_parent(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux prctl):
    a worker must not outlive its supervisor, even one killed with SIGKILL."""
    pr_set_pdeathsig = 1
    prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def _report(control_fd: int, kind: bytes, drain_timeout: float | None = None) -> None:
    data = _MESSAGE.pack(kind, os.getpid())
    if drain_timeout is not None:  # one write (< PIPE_BUF): the pair is never split
        data = _MESSAGE.pack(DRAINS, min(round(drain_timeout * 1000), 2**31 - 1)) + data
    with contextlib.suppress(OSError):
        os.write(control_fd, data)


def plan_cpus(options: RunOptions) -> list[set[int]] | None:
    """The CPUs of each worker (or of the one process serving alone), by `cpu_affinity`."""
    return plan(options.cpu_affinity, options.workers if options.workers > 1 else None)


def serve_worker(make: Callable[[], Server], fd: int, control: int, parent: int) -> None:
    """The body of a worker process (forked or fresh): serve the server `make()` builds on the
    inherited `fd`, report to the supervisor on `control`, then exit; never returns."""
    code = 0
    try:
        _die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)
        server = make()
        set_title(role(server.slot), server.name)
        server.on_serving = lambda: _report(control, READY, server.options.drain_timeout)
        server.on_retiring = lambda reason: _report(control, RETIRING)
        server.prepare(fd, inherited=True, own_socket=lambda: None)
        server.serve(signals=True)
    except WorkerStartError:
        code = _START_FAILED  # logged with its traceback; the parent does not retry
    except ConfigurationError as exc:  # the config file or filter module read again (reload)
        logger.error("worker %d cannot start: %s", os.getpid(), exc)
        if exc.__cause__ is not None:
            logger.debug("worker %d: %s; how:", os.getpid(), exc, exc_info=exc.__cause__)
        code = 1
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
    drain_timeout: float | None = None  # its own, once it serves (its config file's, if fresh)


class Supervisor:
    """The run's owner (see the module docstring); the `Target` of the stop signals."""

    def __init__(
        self,
        filter: Filter,
        recipe: Recipe | None,
        activated: Listener | None = None,
    ) -> None:
        self.filter = filter
        self.options = filter.options
        self.count = filter.options.workers
        self.recipe = recipe
        self.activated = activated
        self.where = str(filter.spec)
        self.parent = os.getpid()
        self.cpus = plan_cpus(self.options)
        self.listener: Listener | None = None
        self.local: Server | None = None
        self.workers: dict[int, _Worker] = {}
        self.generation = 0
        self.reload_started: float | None = None
        self.reload_queued = False  # a SIGHUP during a reload: reload again once it ends
        self.stopping = False
        self.stop_reason = ""
        self.stop_deadline = 0.0
        self.failed = False
        self.deaths: list[float] = []
        self.fd = -1
        self.control_r = -1
        self.control_w = -1

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        """Open the socket, serve (alone or through the workers) until stopped; raise if
        workers failed."""
        # Handlers first: a stop that comes as soon as the socket exists is still an orderly one.
        set_title("sup", self.filter.name)
        with contextlib.ExitStack() as cleanup:
            cleanup.enter_context(handled(self))
            listener = self.listener = self._open_socket()
            cleanup.callback(self._close_listener)
            self.fd = listener.fileno()
            self.control_r, self.control_w = _control_pipe()
            cleanup.callback(os.close, self.control_r)
            cleanup.callback(os.close, self.control_w)
            if self.count == 1:
                self._serve_alone()
            else:
                _systemd.notifier().for_workers(self.count)
                for slot in range(self.count):
                    if self.stopping:
                        break
                    self.spawn(slot, self.generation)
                logger.info("%s: %d workers on %s", self.filter.name, self.count, self.where)
            while self.workers:
                time.sleep(0.02)
                _systemd.notifier().tick(
                    self.where, workers=[w.slot for w in self.workers.values()],
                    stopping=self.stopping,
                )
                self.poll()
        if self.count > 1 or self.generation > 0:  # a serving process alone logs its own
            logger.info("%s: supervisor stopped (%s)%s", self.filter.name,
                        self.stop_reason or "no worker left",
                        "; a worker failed" if self.failed else "")
        if self.failed:
            raise LibmilterError("one or more workers failed; see the log")

    def _open_socket(self) -> Listener:
        """Open the listening socket, then drop privileges.

        Ours, handed to libmilter as fd:N (Debian's libmilter): TCP gets TCP_NODELAY, a unix
        socket its mode and group before it appears at its path.
        """
        o = self.options
        check_can_drop_privileges(o.user, o.group)
        listener = self.activated or open_listener(
            self.filter.spec, o.backlog, o.socket_mode, o.socket_group, owner=o.user
        )
        self.activated = None
        try:
            drop_privileges(o.user, o.group)
        except BaseException:
            listener.close()
            raise
        if o.user is not None or o.group is not None:
            self._check_reload_reads()
            try:
                self._check_spool()
            except BaseException:
                listener.close()
                raise
        return listener

    def _check_spool(self) -> None:
        """As the user it now is: can it make on_message's temporary files? `--spool-dir` was
        checked as the user that started it; a directory only root may write fails every
        message past the spool threshold, so it is said at start."""
        session_class = self.filter.session_class
        if session_class.on_message is MilterSession.on_message:
            return  # no whole-message filter: nothing is spooled
        directory = self.options.spool_dir or tempfile.gettempdir()
        problem = spool_problem(directory)
        if problem is not None:
            who = self.options.user if self.options.user is not None else os.getuid()
            raise ConfigurationError(
                f"spool_dir: user {who} cannot make a temporary file in {directory} "
                f"({problem}); on_message would fail every message past the spool threshold"
            )

    def _check_reload_reads(self) -> None:
        """As the user it now is: can it read what a reload's fresh workers (and any module
        imported later) read? Said at start, not on the day a fix must be deployed."""
        paths: list[str] = []  # the config file and the filter first: most often the cause
        config = self.recipe.config_path if self.recipe is not None else None
        if config is not None:
            paths.append(config)
        module = sys.modules.get(self.filter.session_class.__module__)
        if module is not None and getattr(module, "__file__", None):
            paths.append(str(module.__file__))
        missing = unreadable([*paths, sys.executable, *(p for p in sys.path if p)])
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more"
                                              if len(missing) > 3 else "")
            logger.warning(
                "user %s cannot read %s: a reload (fresh workers), a config file read again "
                "and modules imported later will fail; make them readable to it",
                self.options.user if self.options.user is not None else os.getuid(), shown,
            )

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _serve_alone(self) -> None:
        """Serve in this process; after a reload, the new workers go on."""
        local = self.local = self.filter.server(None, self._cpus(0))
        local.on_tick = self.poll
        local.on_retiring = self.reload
        local.closes_listener = self._refuse_new
        if self.stopping:  # a stop signal came while the socket was being opened
            local.drain(self.stop_reason)
        try:
            local.prepare(self.fd, inherited=False, own_socket=self._close_listener)
            local.serve(signals=False)
        finally:
            self.local = None
        if not local.handing_over:  # shutdown() or a failure: a reload under way ends too
            self._stop_all()
        else:  # it only supervises now: not a serving process alive, for metrics and /healthz
            _metrics.worker_exited(self.parent)

    def _refuse_new(self) -> None:
        if not self.workers and self.listener is not None:
            self.listener.sock.close()

    def _cpus(self, slot: int) -> set[int] | None:
        """The CPUs of `slot`'s workers, planned once at start: a fresh worker that planned
        for itself would read /proc while its sibling confines itself, and could take its CPU."""
        return None if self.cpus is None else self.cpus[slot]

    # -- starting workers ------------------------------------------------------------------

    def spawn(self, slot: int, generation: int) -> int | None:
        """Start a worker for `slot`: forked from this process for the first generation, a
        fresh interpreter for every later one (a reload's, and their successors)."""
        _metrics.before_fork()
        if generation > 0:
            assert self.recipe is not None
            os.set_inheritable(self.fd, True)
            try:
                pid = self.recipe.spawn(self.fd, slot, self.control_w, self._cpus(slot))
            except (OSError, ValueError) as exc:
                logger.error("could not start a worker: %s", exc)
                return None
        else:
            pid = fork(lambda: self._forked(slot))
        self.workers[pid] = _Worker(slot, generation)
        _metrics.worker_started(pid)
        if self.stopping:  # the stop signal came while it was being started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return pid

    def _forked(self, slot: int) -> None:
        os.close(self.control_r)
        serve_worker(lambda: self.filter.server(slot, self._cpus(slot)), self.fd,
                     self.control_w, self.parent)

    # -- the stop signals ------------------------------------------------------------------

    def drain(self, reason: str) -> None:
        """Every serving process drains, then exits."""
        if self.local is not None and self.local.later(lambda: self.drain(reason)):
            return
        if not self.stopping:
            self.stopping = True
            self.stop_reason = reason
            self.stop_deadline = self._kill_deadline()
            if self.local is None or self.workers:
                logger.info("%s: draining %d worker(s)", reason, len(self.workers))
            notify_draining(stopping=True)
        self.signal_all(signal.SIGTERM)
        if self.local is not None:
            self.local.drain(reason)

    def stop_now(self, reason: str) -> None:
        """A second stop signal: every serving process stops without waiting."""
        if self.local is not None:
            self.local.stop_now(reason)
        if self.local is None or self.workers:
            logger.info("%s again: stopping the workers at once", reason)
        self._stop_all()

    def _stop_all(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = self._kill_deadline()
        self.signal_all(signal.SIGTERM)

    def _kill_deadline(self) -> float:
        """When workers still running at a stop are killed: after the longest drain timeout of
        the serving processes (a reload's workers have their config file's), plus a margin."""
        own = self.options.drain_timeout
        timeouts = [own if w.drain_timeout is None else w.drain_timeout
                    for w in self.workers.values()]
        if self.local is not None or not timeouts:
            timeouts.append(own)
        return time.monotonic() + max(timeouts) + _STOP_MARGIN

    def signal_all(self, signum: int, pids: list[int] | None = None) -> None:
        for pid in list(self.workers) if pids is None else pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # -- reload ----------------------------------------------------------------------------

    def reload(self, reason: str) -> None:
        """Start a new generation of fresh workers; the old one drains once they all serve."""
        if self.local is not None and self.local.later(lambda: self.reload(reason)):
            return
        if self.stopping:
            return
        if self.recipe is None:
            logger.warning("%s: this milter cannot start fresh workers; not reloaded", reason)
            return
        if self.local is not None and not self.local.gated:
            logger.warning("%s: libmilter opened the socket itself; cannot reload", reason)
            return
        if self.reload_started is not None:
            logger.info("%s: a reload is under way; another follows it", reason)
            self.reload_queued = True
            return
        self.reload_started = time.monotonic()
        _systemd.notifier().reloading()
        self.generation += 1
        logger.info("%s: reloading: starting %d fresh worker(s)", reason, self.count)
        for slot in range(self.count):
            if self.spawn(slot, self.generation) is None:
                self._reload_failed("a new worker could not be started")
                return

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
            self.signal_all(RETIRE_SIGNAL, old)  # they drain saying why, not as at a stop
            local = self.local
            logger.info(
                "reloaded in %.2f s: generation %d serves; %d old worker(s) drain",
                time.monotonic() - self.reload_started,
                self.generation,
                len(old) + (local is not None),
            )
            self.reload_started = None
            _systemd.notifier().ready()  # the milter serves (reloaded or not)
            if local is not None:
                local.hand_over()
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
        _systemd.notifier().ready()  # the milter serves (reloaded or not)
        self._next_reload()

    def _next_reload(self) -> None:
        if self.reload_queued:
            self.reload_queued = False
            self.reload("SIGHUP")

    # -- reports and exits -----------------------------------------------------------------

    def poll(self) -> None:
        """Reap the workers that exited, read their reports, move a reload on, and kill
        workers still running past the drain timeout."""
        for pid in list(self.workers):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.read_reports()  # a worker's last report before its exit
                self.reaped(pid, status)
        self.read_reports()
        self._check_reload()
        if self.stopping and self.workers and time.monotonic() > self.stop_deadline:
            logger.error("%d worker(s) still running past the drain timeout: killed",
                         len(self.workers))
            self.stop_deadline = float("inf")
            self.signal_all(signal.SIGKILL)

    def read_reports(self) -> None:
        drains: float | None = None  # from a DRAINS report: the next READY's drain timeout
        for kind, value in _read_reports(self.control_r):
            if kind == DRAINS:
                drains = value / 1000
                continue
            worker = self.workers.get(value)
            paired, drains = drains, None
            if worker is None:
                continue
            if kind == READY:
                worker.ready = True
                worker.drain_timeout = paired
            elif kind == RETIRING and not worker.retiring and not self.stopping:
                worker.retiring = True
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
        if code == _START_FAILED:  # as at start-up: not retried (docs/lifecycle.md)
            logger.error("worker %d failed on_worker_start: stopping the milter", pid)
            self.failed = True
            self.drain(f"worker {pid}: on_worker_start failed")
            return
        logger.warning("worker %d died (exit %d); starting a new one", pid, code)
        now = time.monotonic()
        self.deaths[:] = [t for t in self.deaths if now - t < _RESPAWN_WINDOW] + [now]
        if len(self.deaths) > 5 * self.count:
            logger.error("workers keep dying; giving up")
            self.failed = True
            self.drain("workers keep dying")
            return
        _metrics.worker_restarted()
        self.spawn(worker.slot, worker.generation)


def _control_pipe() -> tuple[int, int]:
    """The pipe workers report on: a non-blocking read end, an inheritable write end."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_inheritable(write, True)
    return read, write


def _read_reports(fd: int) -> list[tuple[bytes, int]]:
    """The (kind, pid) reports waiting on `fd` (a DRAINS report carries milliseconds)."""
    chunks: list[bytes] = []
    while True:  # all there is: writes are whole in the pipe, so pairs are whole here too
        try:
            data = os.read(fd, _MESSAGE.size * 64)
        except OSError:  # also BlockingIOError: nothing (more) to read
            break
        if not data:
            break
        chunks.append(data)
    data = b"".join(chunks)
    return [_MESSAGE.unpack_from(data, offset)
            for offset in range(0, len(data) - _MESSAGE.size + 1, _MESSAGE.size)]

