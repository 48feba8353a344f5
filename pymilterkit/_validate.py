"""Checks and conversions for everything a filter hands to libmilter.

Each function turns a user argument into the exact bytes libmilter will send, or raises
`InvalidArgumentError` saying what to change. They run before any C call, in the real runner and
in the test harness alike, so a test that passes in the harness cannot fail here at run time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ._errors import InvalidArgumentError

MAX_DATA = 65535
"""Largest data part libmilter accepts in one packet (MILTER_MAX_DATA_SIZE)."""
MAX_REPLY_LINES = 32
MAX_REPLY_LINE = 980

_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")
# A line break is only allowed as folding: CRLF or LF followed by a space or tab.
_BAD_BREAK = re.compile(rb"\r(?!\n)|\n(?![ \t])")
_REPLY_CODE = re.compile(r"[45][0-9][0-9]\Z")
_XCODE = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}\Z")


def to_bytes(value: str | bytes, what: str) -> bytes:
    """Encode `str` as UTF-8 with surrogateescape (inverse of how input is decoded)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def _no_nul(raw: bytes, what: str) -> bytes:
    if b"\0" in raw:
        raise InvalidArgumentError(f"{what} contains a NUL byte; remove it")
    return raw


def _single_line(raw: bytes, what: str) -> bytes:
    _no_nul(raw, what)
    if b"\r" in raw or b"\n" in raw:
        raise InvalidArgumentError(
            f"{what} contains CR or LF; it must be one line ({raw[:60]!r})"
        )
    return raw


def check_size(size: int, what: str) -> None:
    """Refuse a packet libmilter would refuse (> 65,535 bytes of data)."""
    if size > MAX_DATA:
        raise InvalidArgumentError(
            f"{what} is {size} bytes on the wire; libmilter's limit is {MAX_DATA}"
        )


_header_names: dict[str, bytes] = {}
"""Header names already checked: a filter uses a handful, so the check runs once for each."""


def header_name(name: str | bytes) -> bytes:
    """A header field name: printable ASCII, no colon, no white space, not empty."""
    if name.__class__ is str:
        known = _header_names.get(name)
        if known is not None:
            return known
    raw = to_bytes(name, "header name")
    if not _HEADER_NAME.match(raw):
        raise InvalidArgumentError(
            f"invalid header name {raw[:60]!r}: use printable ASCII without ':' or white space"
        )
    if name.__class__ is str:
        if len(_header_names) >= 1024:
            _header_names.clear()
        _header_names[name] = raw
    return raw


def header_value(value: str | bytes) -> bytes:
    """A header value; line breaks only as folding (`\\n` + space or tab), no NUL.

    `header` takes a printable `str` (no line break, no NUL) without calling this.
    """
    raw = _no_nul(to_bytes(value, "header value"), "header value")
    bad = _BAD_BREAK.search(raw)
    if bad is not None:
        raise InvalidArgumentError(
            "header value has a line break not followed by a space or tab at offset "
            f"{bad.start()}: that would start a new header; fold with '\\n\\t' or remove it"
        )
    return raw


def header(name: str | bytes, value: str | bytes, extra: int = 0) -> tuple[bytes, bytes]:
    """Name and value of one header action, with the packet size checked."""
    # The common case without a further call: a name `header_name` has already checked (its
    # cache), and a printable str value (no line break, no NUL: nothing to check).
    raw_name = _header_names.get(name) if name.__class__ is str else None
    if raw_name is None:
        raw_name = header_name(name)
    if value.__class__ is str and value.isprintable():
        raw_value = value.encode("utf-8", "surrogateescape")
    else:
        raw_value = header_value(value)
    size = len(raw_name) + len(raw_value) + 2 + extra
    if size > MAX_DATA:
        check_size(size, "header")
    return raw_name, raw_value


def address(value: str | bytes, what: str) -> bytes:
    """An envelope address for chgfrom/addrcpt/delrcpt: one line, not empty."""
    raw = _single_line(to_bytes(value, what), what)
    if not raw.strip():
        raise InvalidArgumentError(f"{what} is empty")
    return raw


def esmtp_args(params: str | bytes | None, what: str) -> bytes | None:
    """ESMTP parameters text for chgfrom/addrcpt_par, or None."""
    if params is None:
        return None
    return _single_line(to_bytes(params, what), what)


def text(value: str | bytes, what: str) -> bytes:
    """A non-empty single line (quarantine reason, macro name)."""
    raw = _single_line(to_bytes(value, what), what)
    if not raw:
        raise InvalidArgumentError(f"{what} is empty")
    return raw


def index(value: int, minimum: int, what: str) -> int:
    """A header index: an int not below `minimum` that fits libmilter's C int."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be int, not {type(value).__name__}")
    if not minimum <= value <= 0x7FFFFFFF:
        raise InvalidArgumentError(f"{what} must be >= {minimum}, got {value}")
    return value


def reply(
    code: str, xcode: str | None, lines: Sequence[str]
) -> tuple[bytes, bytes | None, list[bytes]]:
    """An SMTP reply: 4xx/5xx code, matching enhanced code, <= 32 lines; `%` is escaped.

    libmilter hands the text to the MTA as a format string (sendmail) or unescapes `%%`
    (Postfix), so every `%` is doubled here and the client sees exactly what was given.
    """
    if not isinstance(code, str) or not _REPLY_CODE.match(code):
        raise InvalidArgumentError(f"reply code must be 4xx or 5xx (three digits), got {code!r}")
    raw_x: bytes | None = None
    if xcode is not None:
        match = _XCODE.match(xcode) if isinstance(xcode, str) else None
        if match is None:
            raise InvalidArgumentError(
                f"enhanced status code must look like '5.7.1', got {xcode!r}"
            )
        if match.group(1) != code[0]:
            raise InvalidArgumentError(
                f"enhanced code {xcode} does not match reply code {code}: "
                f"both must start with {code[0]}"
            )
        raw_x = xcode.encode("ascii")
    if len(lines) > MAX_REPLY_LINES:
        raise InvalidArgumentError(
            f"a reply has at most {MAX_REPLY_LINES} lines, got {len(lines)}"
        )
    out: list[bytes] = []
    for number, line in enumerate(lines, 1):
        raw = _single_line(to_bytes(line, "reply line"), f"reply line {number}")
        raw = raw.replace(b"%", b"%%")
        if len(raw) > MAX_REPLY_LINE:
            raise InvalidArgumentError(
                f"reply line {number} is {len(raw)} bytes ('%' counts twice); "
                f"the limit is {MAX_REPLY_LINE}"
            )
        out.append(raw)
    return code.encode("ascii"), raw_x, out


def body(chunk: bytes | bytearray | memoryview) -> bytes:
    """A body chunk for replace_body: any bytes (NUL included)."""
    if isinstance(chunk, str):
        raise TypeError("replace_body takes bytes; encode the text first (e.g. .encode())")
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise TypeError(f"replace_body takes bytes, not {type(chunk).__name__}")
    return bytes(chunk)


def macro_name(name: str) -> bytes:
    """A macro name, `i` or `{i}` form."""
    return text(name, "macro name")
