"""Log lines that untrusted input cannot forge or break.

Recipients, senders, header values and exception messages come from the SMTP client. Written to
a log verbatim, a CR/LF would start a fake log line, an ESC sequence would drive the reader's
terminal, and a byte that was not UTF-8 (kept as a lone surrogate by `surrogateescape`) would
make the log handler itself fail. `EscapeControls` (the base of `_logging.SessionFields`, the
filter on the `pymilterkit` loggers and on the command's log handler) renders each record's
message and its exception text with such characters escaped (`\\r`, `\\n`, `\\t`, `\\x1b`,
...), while the traceback keeps its own line structure.

It runs only for records that are actually emitted (a logger filter runs after the level check),
so logging that is switched off costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import re
import traceback
from types import TracebackType

__all__ = ["EscapeControls", "escape_control"]

# C0 controls, DEL, C1 controls, Unicode line/paragraph separators, and lone surrogates
# (undecodable input bytes under surrogateescape).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _replace(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a raw byte kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with control characters, separators and lone surrogates shown as escapes."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_replace, text)


def _escape_chain(te: traceback.TracebackException, seen: set[int]) -> None:
    # The message and notes of each exception in the chain are untrusted; the stack is ours.
    if id(te) in seen:
        return
    seen.add(id(te))
    te._str = escape_control(te._str)  # type: ignore[attr-defined]
    notes = getattr(te, "__notes__", None)
    if notes:
        te.__notes__ = [escape_control(str(note)) for note in notes]
    for nested in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        if nested is not None:
            _escape_chain(nested, seen)


def format_exception(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None],
) -> str:
    """The traceback as `logging.Formatter.formatException` writes it, messages escaped."""
    te = traceback.TracebackException(*exc_info)
    _escape_chain(te, set())
    return "".join(te.format()).rstrip("\n")


class EscapeControls(logging.Filter):
    """Escapes control characters in a record's message and exception text; never drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - leave a broken record to logging's own reporting
            return True
        record.msg = escape_control(message)
        record.args = None
        exc_info = record.exc_info
        if exc_info and exc_info[0] is not None and not record.exc_text:
            # On failure, the formatter renders the traceback itself.
            with contextlib.suppress(Exception):
                record.exc_text = format_exception(exc_info)
        return True

