"""The run options, each said once: `RunOptions`, a frozen dataclass whose fields carry their
check, their `run` flag and config key (`Flag`).

`Milter(...)` validates its keywords by building a `RunOptions`; the `run` command's flags are
generated from the fields' `Flag`s (plus the command's own: the target, `--config`, logging);
a config file's keys are those flags without their dashes; a reload's fresh worker gets the same
`RunOptions` (pickled) or the command line to parse again.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ._affinity import CpuAffinity
from ._affinity import check as check_affinity
from ._affinity import parse as parse_affinity
from ._errors import ConfigurationError
from ._flags import Status
from ._logging import LOG_FORMATS
from ._record import RecordOptions
from ._socketspec import parse_socket_spec

__all__ = [
    "COMMAND_FLAGS",
    "DEFAULT_DRAIN_TIMEOUT",
    "STAGE_DEADLINES",
    "ErrorStatus",
    "Flag",
    "MetricsAddress",
    "RunOptions",
    "StageTimeout",
    "check_stage_timeout",
    "log_level",
    "parse_address",
    "run_flags",
    "stage_deadlines",
]

ErrorStatus = Literal[
    Status.TEMPFAIL, Status.REJECT, Status.CONTINUE, Status.ACCEPT, Status.DISCARD
]
_ERROR_STATUSES = (Status.TEMPFAIL, Status.REJECT, Status.CONTINUE, Status.ACCEPT, Status.DISCARD)
_STATUS_NAMES = tuple(s.name.lower() for s in _ERROR_STATUSES)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """A log level's name in any case (`info`, as other milters take it), as logging names it."""
    import argparse

    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"not a log level: {text!r} (one of {', '.join(LOG_LEVELS)}, in any case)")
    return level

DEFAULT_DRAIN_TIMEOUT = 30.0
"""Seconds a drain (SIGTERM) waits for the sessions in flight before ending them."""


@dataclasses.dataclass(frozen=True)
class Flag:
    """A `run` setting on the command line and in a config file (key: the flag without `--`,
    or `dest` for a positional).

    `type` turns the text into a value (None: the text; `switch`: a flag without a value);
    `to_option` turns that value into the `Milter` keyword's, with the values of `parts` (flags
    of the same option: `--record-sample` of `--record`) after it.
    """

    flag: str | None
    help: str
    dest: str = ""
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    required: bool = False
    switch: bool = False
    to_option: Callable[..., Any] | None = None
    parts: tuple[Flag, ...] = ()
    append: bool = False  # repeatable: the values come as a list

    def __post_init__(self) -> None:
        if not self.dest and self.flag:
            object.__setattr__(self, "dest", self.flag[2:].replace("-", "_"))

    @property
    def key(self) -> str:
        """The config file key."""
        return self.flag[2:] if self.flag else self.dest


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


StageTimeout = float | Mapping[str, float] | None
"""`stage_timeout`: seconds for every stage, per stage (key: the method name without `on_`, or
`default`), or None: `STAGE_DEADLINES`. 0 turns a deadline off."""
_COMMAND, _CONTENT = 30.0, 300.0
STAGE_DEADLINES: dict[str, float] = {
    **dict.fromkeys(("connect", "helo", "mail", "rcpt", "data", "unknown", "abort", "close"),
                    _COMMAND),
    **dict.fromkeys(("header", "eoh", "body"), _CONTENT),
    "eom": 600.0,
}
"""The default deadlines: what Postfix waits for an answer (milter_command_timeout 30 s,
milter_content_timeout 300 s), so they never cancel what the MTA still waits for; on_eom 600 s,
because progress keeps Postfix waiting and the SMTP client waits 10 minutes for the answer to
its final dot (RFC 5321 4.5.3.2.6). on_abort and on_close are not answered: 30 s."""
_ALIASES = {"message": "eom"}  # on_message runs in the end-of-message callback: one deadline
_NAMES = f"one of {', '.join(STAGE_DEADLINES)}, message (= eom), or default"
def _stage_seconds(text: str) -> tuple[str, float]:
    """`--stage-timeout [STAGE=]S`: (stage or "default", seconds)."""
    import argparse

    stage, sep, seconds = text.rpartition("=")
    stage = stage.strip() if sep else "default"
    if stage != "default" and stage not in STAGE_DEADLINES and stage not in _ALIASES:
        raise argparse.ArgumentTypeError(f"unknown stage {stage!r} ({_NAMES})")
    return stage, _seconds(seconds)


def _stage_items(items: list[tuple[str, float]] | None) -> dict[str, float] | None:
    return None if items is None else dict(items)


def check_stage_timeout(value: object) -> StageTimeout:
    """`value` as `stage_timeout` (a number or a table by stage), checked and normalised."""
    if value is None:
        return None
    table: Mapping[Any, Any] = value if isinstance(value, Mapping) else {"default": value}
    named: dict[str, float] = {}
    for stage, seconds in table.items():
        if stage != "default" and stage not in STAGE_DEADLINES and stage not in _ALIASES:
            raise ConfigurationError(f"stage_timeout: unknown stage {stage!r} ({_NAMES})")
        if not (_number(seconds) and seconds >= 0):
            raise ConfigurationError(f"stage_timeout[{stage!r}] must be a finite number of "
                                     f"seconds >= 0 (0: none): {seconds!r}")
        key = _ALIASES.get(stage, stage)
        if named.get(key, seconds) != seconds:
            raise ConfigurationError(
                "stage_timeout: 'message' and 'eom' are one deadline (on_message runs at the "
                "end of message, as on_eom does): give one of them")
        named[key] = float(seconds)
    if not isinstance(value, Mapping):
        return named["default"]
    return named


def stage_deadlines(value: StageTimeout) -> dict[str, float | None]:
    """Seconds each stage method (`on_rcpt`) may run, None: no deadline; from `stage_timeout`."""
    table = {} if value is None else value if isinstance(value, Mapping) else {"default": value}
    default = table.get("default")
    return {
        f"on_{stage}": table.get(stage, builtin if default is None else default) or None
        for stage, builtin in STAGE_DEADLINES.items()
    }


def _octal_mode(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 8)
    except ValueError:
        raise ConfigurationError(
            f"--socket-mode wants an octal mode like 660, got {text!r}"
        ) from None


def _status(name: str) -> Status:
    return _ERROR_STATUSES[_STATUS_NAMES.index(name)]


# -- the checks, by the message they give ------------------------------------------------------

Check = Callable[[str, Any], Any]


C_INT_MAX = 2**31 - 1
"""libmilter takes timeouts, backlogs and trace levels as a C int: more would be truncated."""


def _number(value: object) -> bool:
    """A finite int or float (not a bool, NaN, infinity or an int no float can hold)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1e308


def _spool_dir(path: object) -> bool:
    """A directory where a temporary file can be made (a read-only one, /proc, fails every
    message past the spool threshold later otherwise)."""
    return isinstance(path, str) and os.path.isdir(path) and spool_problem(path) is None


def spool_problem(path: str) -> str | None:
    """Why this process cannot make a temporary file in `path` (None: it can); the runner asks
    again once privileges are dropped."""
    try:
        with tempfile.TemporaryFile(dir=path):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _c_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= C_INT_MAX


def _check(ok: Callable[[Any], bool], message: str, convert: Callable[[Any], Any] = lambda v: v,
           optional: bool = True) -> Check:
    def check(name: str, value: Any) -> Any:
        if optional and value is None:
            return None
        if not ok(value):
            raise ConfigurationError(message.format(name=name, value=value))
        return convert(value)

    return check


def _name(label: str, value: str | None) -> str | None:
    if value is not None and "\0" in value:
        raise ConfigurationError("name must not contain NUL")
    return value


_POSITIVE_INT = _check(lambda v: _c_int(v, 1), "{name} must be an int from 1 to "
                       f"{C_INT_MAX}: {{value!r}}")
_STATUS = _check(lambda v: v in _ERROR_STATUSES,
                 "{name} must be one of " + str([s.name for s in _ERROR_STATUSES]), optional=False)
_SECONDS = _check(lambda v: _number(v) and v > 0,
                  "{name} must be a positive number of seconds or None", float)
_LIMIT = _check(lambda v: _number(v) and v > 0, "{name} must be a positive number: {value!r}")


def _option(default: Any, check: Check | None = None, flag: Flag | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"check": check, "flag": flag})


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a milter runs: the keywords of `Milter` (and `socket`), checked when built."""

    socket: str = _option(None, flag=Flag(
        "--socket", "unix:/path, inet:PORT@HOST, inet6:..., or systemd (socket activation)",
        required=True))
    name: str | None = _option(None, _name, Flag("--name", "filter name reported to libmilter"))
    timeout: int | None = _option(None, _check(
        lambda v: _c_int(v, 1),
        f"{{name}} must be a whole number of seconds from 1 to {C_INT_MAX}: {{value!r}}",
    ), Flag("--timeout", "libmilter I/O timeout in seconds", type=int))
    backlog: int | None = _option(None, _POSITIVE_INT, Flag("--backlog", "listen backlog",
                                                            type=int))
    debug_level: int = _option(0, _check(
        lambda v: _c_int(v, 0), f"{{name}} must be an int from 0 to {C_INT_MAX}: {{value!r}}",
        optional=False,
    ), Flag("--debug-level", "libmilter trace level", type=int, default=0))
    error_status: ErrorStatus = _option(Status.TEMPFAIL, _STATUS, Flag(
        "--error-status", "answer when a stage method raises (default tempfail)",
        default="tempfail", choices=_STATUS_NAMES, to_option=_status))
    workers: int = _option(1, _check(
        lambda v: isinstance(v, int) and v >= 1, "{name} must be an int >= 1: {value!r}",
        optional=False,
    ), Flag("--workers", "pre-forked worker processes", type=int, default=1))
    socket_mode: int | None = _option(None, _check(
        lambda v: 0 <= v <= 0o777, "socket_mode must be a permission mode like 0o660"
    ), Flag("--socket-mode", "octal mode of a unix socket (default 660: owner and group only)",
            to_option=_octal_mode))
    # type=str: a TOML integer is an id too (resolved by name first, as chown does)
    socket_group: str | int | None = _option(None, flag=Flag(
        "--socket-group", "group (name or id) of a unix socket (e.g. postfix)", type=str))
    user: str | int | None = _option(None, flag=Flag(
        "--user", "drop privileges to this user (name or id) after opening the socket",
        type=str))
    group: str | int | None = _option(None, flag=Flag(
        "--group", "drop privileges to this group (name or id)", type=str))
    cpu_affinity: CpuAffinity = _option("auto", lambda _, v: check_affinity(v), Flag(
        "--cpu-affinity",
        "auto (default): each process on one CPU; none: any CPU; or CPUs like 0,2-3",
        default="auto", metavar="auto|none|CPUS", to_option=parse_affinity))
    config: object | None = _option(None)
    metrics: str | None = _option(None, lambda _, v: _metrics_address(v), Flag(
        "--metrics", "serve /metrics (Prometheus) and /healthz on this address, e.g. "
        "127.0.0.1:9100 (needs pymilterkit[metrics])", metavar="HOST:PORT"))
    dry_run: bool = _option(False, _check(
        lambda v: isinstance(v, bool), "{name} must be True or False: {value!r}",
        optional=False,
    ), Flag("--dry-run", "run the filter but send CONTINUE and no modification; log what it "
            "would do", switch=True, default=False))
    stage_timeout: StageTimeout = _option(None, lambda _, v: check_stage_timeout(v), Flag(
        "--stage-timeout", "deadline of every stage (S) or of one (STAGE=S), repeatable; 0: "
        "none; default: what Postfix waits (30 s, header/eoh/body 300 s, eom 600 s). An async "
        "stage past it is cancelled and answered --timeout-status, a sync one logged",
        type=_stage_seconds, metavar="[STAGE=]S", append=True, to_option=_stage_items))
    timeout_status: ErrorStatus = _option(Status.TEMPFAIL, _STATUS, Flag(
        "--timeout-status", "answer for a stage past --stage-timeout (default tempfail)",
        default="tempfail", choices=_STATUS_NAMES, to_option=_status))
    progress_interval: float | None = _option(10.0, _SECONDS, Flag(
        "--progress-interval", "while on_eom runs, tell the MTA every S seconds it is still "
        "working (default 10; 0: never)", type=_seconds, default=10.0, metavar="S",
        to_option=lambda v: v or None))
    drain_timeout: float = _option(DEFAULT_DRAIN_TIMEOUT, _check(
        lambda v: _number(v) and 0 <= v < float("inf"),
        "{name} must be seconds >= 0: {value!r}", float, optional=False,
    ), Flag("--drain-timeout", "on SIGTERM, let sessions in flight finish for up to S seconds "
            "(default 30)", type=float, default=DEFAULT_DRAIN_TIMEOUT, metavar="S"))
    max_sessions_per_worker: int | None = _option(None, _LIMIT, Flag(
        "--max-sessions-per-worker", "retire a worker (drain, replace) after N sessions",
        type=int, metavar="N"))
    max_worker_rss: float | None = _option(None, _LIMIT, Flag(
        "--max-worker-rss", "retire a worker (drain, replace) whose memory passes MIB MiB",
        type=float, metavar="MIB"))
    record: RecordOptions | None = _option(None, _check(
        lambda v: isinstance(v, RecordOptions), "{name} must be a RecordOptions: {value!r}",
    ), Flag("--record", "write what the filter saw and did, one file per connection, into DIR "
            "(docs/guides/record-replay.md)", metavar="DIR", to_option=RecordOptions.from_flags,
            parts=(
                Flag("--record-sample", "share of connections recorded, 0 to 1 (default 1)",
                     type=float, default=1.0, metavar="FRACTION"),
                Flag("--record-body", "record message bodies (default yes)", default="yes",
                     choices=("yes", "no")),
                Flag("--record-max-mb", "start no recording past N MiB of them in DIR "
                     "(default 1024)", type=float, default=1024.0, metavar="N"))))

    spool_threshold: int = _option(1024 * 1024, _check(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "{name} must be a number of bytes >= 1: {value!r}", optional=False,
    ), Flag("--spool-threshold", "on_message: bytes of a message held in memory before it "
            "goes to a temporary file (default 1 MiB)", type=int, default=1024 * 1024,
            metavar="BYTES"))
    spool_dir: str | None = _option(None, _check(
        _spool_dir, "{name} must be an existing directory a temporary file can be made in: "
        "{value!r}",
    ), Flag("--spool-dir", "on_message: directory of the temporary files (default: TMPDIR)",
            metavar="DIR"))
    max_message_size: int | None = _option(None, _check(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "{name} must be a number of bytes >= 1 or None: {value!r}",
    ), Flag("--max-message-size", "on_message: bigger messages are not collected and get the "
            "class's too_big answer (overrides the class's max_message_size)", type=int,
            metavar="BYTES"))

    def __post_init__(self) -> None:
        spec = parse_socket_spec(self.socket)
        for field in dataclasses.fields(self):
            check = field.metadata["check"]
            if check is not None:
                object.__setattr__(self, field.name, check(field.name, getattr(self, field.name)))
        if (self.socket_mode is not None or self.socket_group is not None) and (
            spec.kind != "unix"
        ):
            raise ConfigurationError("socket_mode and socket_group apply to unix sockets only")

    def keywords(self) -> dict[str, Any]:
        """The `Milter` keywords these options came from (all but `socket`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "socket"}

    @classmethod
    def from_args(cls, args: object, config: object | None) -> RunOptions:
        """The options a parsed `run` command line gives (`config`: the filter's)."""
        values: dict[str, Any] = {"config": config}
        for field in dataclasses.fields(cls):
            flag: Flag | None = field.metadata["flag"]
            if flag is not None:
                value = getattr(args, field.name)
                parts = (getattr(args, part.dest) for part in flag.parts)
                values[field.name] = value if flag.to_option is None else flag.to_option(
                    value, *parts)
        return cls(**values)


def _metrics_address(value: str | None) -> str | None:
    if value is not None:
        parse_address(value)
    return value


class MetricsAddress:
    """Where the HTTP endpoint listens: `HOST:PORT` (`[::1]:9100` for IPv6; port 0: any)."""

    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> MetricsAddress:
    """Parse `--metrics HOST:PORT`; the host is required (it is the only address bound)."""
    if not isinstance(text, str):
        raise ConfigurationError(f"metrics must be 'HOST:PORT', got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigurationError(f"metrics: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigurationError(f"metrics: write an IPv6 address in brackets: [{host}]:PORT")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigurationError(
            f"metrics must be HOST:PORT (e.g. 127.0.0.1:9100, [::1]:9100), got {text!r}"
        )
    return MetricsAddress(host, int(port_text))


COMMAND_FLAGS: tuple[Flag, ...] = (
    Flag(None, "the MilterSession subclass", dest="target", metavar="MODULE:CLASS",
         required=True),
    Flag("--log-level", "same as the global --log-level", dest="run_log_level",
         choices=LOG_LEVELS, type=log_level),
    Flag("--log-format", "text (default), or json: one object per line with the session fields",
         default="text", choices=LOG_FORMATS),
    Flag("--syslog", "log to syslog (/dev/log, facility mail) as pymilterkit[PID] instead of "
         "stderr", switch=True, default=False),
    Flag("--root-log-level", "level of every logger outside pymilterkit and the filter's own "
         "package: the libraries it uses (default WARNING)", default="WARNING",
         choices=LOG_LEVELS, type=log_level),
)
"""The `run` settings that are not `Milter` options: the target and logging."""


def run_flags() -> tuple[Flag, ...]:
    """Every setting of `run` (each a config key), with its argparse `dest`."""
    fields = tuple(
        flag
        for f in dataclasses.fields(RunOptions)
        if (own := f.metadata["flag"]) is not None
        for flag in (dataclasses.replace(own, dest=f.name), *own.parts)
    )
    return (COMMAND_FLAGS[0], *fields, *COMMAND_FLAGS[1:])

