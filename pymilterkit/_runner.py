"""The public runner: `Milter` (the run's options and `run()`), `run`, `shutdown`, and the
libmilter settings of the whole process. The run itself is `_prefork.Supervisor`'s (serving
alone or through workers); one serving process is `_serve.Server`.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any, ParamSpec

from . import _libmilter as c
from . import _systemd
from ._affinity import CpuAffinity
from ._config import install as install_config
from ._errors import ConfigurationError
from ._flags import Status
from ._fresh import Recipe
from ._limits import raise_nofile_limit
from ._options import DEFAULT_DRAIN_TIMEOUT, ErrorStatus, RunOptions, parse_address
from ._prefork import Supervisor
from ._serve import Filter
from ._serve import current as current_server
from ._session import MilterSession
from ._socketspec import SocketSpec, parse_socket_spec

__all__ = ["Milter", "libmilter_version", "run", "set_debug_level", "shutdown"]

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
