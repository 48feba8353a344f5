"""Session-tagged log records, and the command's log set-up (text, JSON, syslog).

A record about a session carries the session (`extra={"pmk_session": ...}`); nothing else
happens per message. `SessionFields`, a filter on the `pymilterkit` loggers (it runs after the
level check), works the fields out only when a record is emitted: `session_id` (`PID-N`, stable
for the connection), `queue_id` (macro `i`, looked up at that moment: the MTA sends it once it
has one), `stage` (the record's, else the one running) and `client` (macro `{client_addr}`,
else the address in macro `_`). It also escapes control characters (`_logsafe`).
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import stat
import sys
import threading
from collections.abc import MutableMapping
from typing import IO, Any

from ._errors import ConfigurationError
from ._logsafe import EscapeControls, escape_control

__all__ = [
    "LOG_FORMATS",
    "SessionFields",
    "SessionLog",
    "configure",
    "install",
    "session_log",
    "settings",
]

LOG_FORMATS = ("text", "json")
SYSLOG_ADDRESS = "/dev/log"
FILTER_LOGGERS = "pymilterkit.filter"
"""Parent of the loggers of `MilterSession.log` (one per class: `pymilterkit.filter.NAME`)."""
_FIELDS = ("session_id", "queue_id", "stage", "client")
_LABELS = ("session", "queue_id", "stage", "client")  # in text lines


def _macro(session: Any, name: bytes) -> str | None:
    backend = session._pmk_backend
    if backend is None:
        return None
    raw = backend.getsymval(name)
    return None if raw is None else escape_control(raw.decode("utf-8", "surrogateescape"))


def _client(session: Any) -> str | None:
    address = _macro(session, b"{client_addr}")
    if address:
        return address
    both = _macro(session, b"_")  # "host.example [192.0.2.1]" (Sendmail: may add more)
    if both and "[" in both:
        return both[both.rindex("[") + 1 :].partition("]")[0]
    return both or None


class SessionFields(EscapeControls):
    """Sets `session_id`, `queue_id`, `stage` and `client` on each emitted record (None when
    unknown or not about a session), and escapes control characters; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if "pmk_done" in fields:  # done already (by the logger's filter, then the handler's)
            return True
        super().filter(record)
        session = fields.get("pmk_session")
        stage = fields.get("pmk_stage")
        session_id = queue_id = client = None
        if session is not None:
            number = session._pmk_id
            session_id = f"{record.process}-{number}" if number else None
            if stage is None:
                stage = session._pmk_stage
            try:  # never let a lookup break logging
                queue_id = _macro(session, b"i")
                client = _client(session)
            except Exception:  # noqa: BLE001
                pass
        fields["session_id"] = session_id
        fields["queue_id"] = queue_id
        fields["stage"] = stage
        fields["client"] = client
        fields["pmk_done"] = True
        return True


_install_lock = threading.Lock()


def install(logger: logging.Logger) -> logging.Logger:
    """Attach one `SessionFields` to `logger` (idempotent); returns it."""
    with _install_lock:
        if not any(isinstance(f, SessionFields) for f in logger.filters):
            logger.addFilter(SessionFields())
    return logger


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """`MilterSession.log`: a logger whose records carry the session's fields."""

    def __init__(self, logger: logging.Logger, session: object) -> None:
        super().__init__(logger, {"pmk_session": session})
        self.session = session

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        # Only for records that pass the level check. Keeps the caller's own `extra`.
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "pmk_session": self.session}
        return msg, kwargs


def session_log(session: object) -> SessionLog:
    """The `log` of `session`: logger `pymilterkit.filter.<class name>`."""
    name = f"{FILTER_LOGGERS}.{type(session).__name__}"
    return SessionLog(install(logging.getLogger(name)), session)


# -- formatting -------------------------------------------------------------------------------


def _context(record: logging.LogRecord) -> str:
    """`session=... queue_id=... stage=... client=...: ` with the known fields, or ''."""
    parts = [
        f"{label}={value}"
        for name, label in zip(_FIELDS, _LABELS, strict=True)
        if (value := getattr(record, name, None))
    ]
    return " ".join(parts) + ": " if parts else ""


_TEXT_PREFIX = "%(asctime)s %(name)s[%(process)d] %(levelname)s "
_SYSLOG_IDENT = "pymilterkit[%(process)d]: "


class TextFormatter(logging.Formatter):
    """`TIME LOGGER[PID] LEVEL session=... queue_id=... stage=... client=...: message`."""

    def __init__(self, prefix: str = _TEXT_PREFIX) -> None:
        super().__init__(prefix + "%(pmk_context)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.pmk_context = _context(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time, level, logger, message, the session
    fields (null when unknown), pid, and the exception text if any."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        document: dict[str, object] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape_control(message),
            **{name: getattr(record, name, None) for name in _FIELDS},
            "pid": record.process,
        }
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = record.stack_info
        text = json.dumps(document, ensure_ascii=False)
        return self.prefix % {"process": record.process} + text if self.prefix else text


def formatter(log_format: str, *, syslog: bool = False) -> logging.Formatter:
    """The formatter of `--log-format` (`text` or `json`); for syslog, `pymilterkit[PID]: ...`
    (the syslog daemon adds time and host)."""
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    if log_format == "json":
        return JsonFormatter(_SYSLOG_IDENT if syslog else "")
    return TextFormatter(_SYSLOG_IDENT + "%(levelname)s " if syslog else _TEXT_PREFIX)


_handler: logging.Handler | None = None
_settings: dict[str, Any] | None = None


def settings() -> dict[str, Any] | None:
    """The arguments of the set-up `configure` made, or None: a reload's fresh worker logs
    with them until it has read the command line and config file again."""
    return None if _settings is None else dict(_settings)


def configure(
    level: str = "INFO",
    *,
    log_format: str = "text",
    syslog: bool = False,
    root_level: str = "WARNING",
    stream: IO[str] | None = None,
    force: bool = False,
) -> logging.Handler | None:
    """Set up logging for the command: one handler on the root logger (stderr, or syslog's
    mail facility at `/dev/log`) with the chosen format; `level` for the `pymilterkit`
    loggers, `root_level` for every other logger (libraries, the filter's own modules).

    Like `logging.basicConfig`, it does nothing when the root logger has handlers already
    (an application or a test set logging up), unless `force`. Returns the handler.
    """
    global _handler, _settings
    root = logging.getLogger()
    if root.handlers and not force:
        return None
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    handler: logging.Handler
    if syslog:
        # SysLogHandler ignores a missing socket (and then every record): say so at start.
        try:
            is_socket = stat.S_ISSOCK(os.stat(SYSLOG_ADDRESS).st_mode)
        except OSError as exc:
            raise ConfigurationError(
                f"--syslog: cannot log to {SYSLOG_ADDRESS}: {exc.strerror}"
            ) from None
        if not is_socket:
            raise ConfigurationError(f"--syslog: cannot log to {SYSLOG_ADDRESS}: not a socket")
        handler = logging.handlers.SysLogHandler(
            SYSLOG_ADDRESS, logging.handlers.SysLogHandler.LOG_MAIL
        )
    else:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(log_format, syslog=syslog))
    # Also for the records of other loggers (the filter's own modules): escaped, with fields.
    handler.addFilter(SessionFields())
    root.addHandler(handler)
    root.setLevel(root_level)
    install(logging.getLogger("pymilterkit")).setLevel(level)
    _handler = handler
    _settings = {"level": level, "log_format": log_format, "syslog": syslog,
                 "root_level": root_level}
    return handler
