"""What the MTA knows about a connection and a message, and how it hands a message over.

A message is given whole (RFC 5322 `bytes`, or an `email.message.EmailMessage`) and split the
way Postfix splits it for a milter:

* headers one by one, in order, as `(name, value)`; the value is what follows the colon, folded
  lines joined with `\\n` (LF) plus the continuation's leading white space, CR removed; without
  `HDR_LEADSPC` one leading space is removed (Postfix does the same), with it the value is
  passed verbatim;
* the body (everything after the empty line) with CRLF line endings, in chunks of at most
  65,535 bytes.

Macros: unless `default_macros=False`, the MTA sends Postfix-like macros (`j`, `{daemon_name}`,
`v`, `_` at connect; `{mail_addr}` at MAIL; `i`, `{rcpt_addr}` at RCPT; `i` at DATA, end of
headers and end of message), overlaid by the ones given. When the milter asks for macros
(smfi_setsymlist) only those are sent, looked up among all the values known for the message.
"""

from __future__ import annotations

import dataclasses
import email.message
import email.policy
import hashlib
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address

from .._flags import Stage
from .._protocol import STAGES
from .._types import InetAddress, UnixAddress
from ._results import Step

__all__ = [
    "ClientInfo",
    "Envelope",
    "MessageInput",
    "Recipient",
    "as_bytes",
    "normalize_macro_name",
    "split_message",
]

MessageInput = bytes | bytearray | memoryview | email.message.EmailMessage | str
"""A whole message: bytes, an EmailMessage, or (for convenience) ASCII/UTF-8 text."""

MACRO_STAGES: dict[Step, Stage] = {
    Step(info.step): info.macros for info in STAGES if info.macros is not None
}
"""Conversation steps that carry macros, and their SMFIM_* stage."""

DEFAULT_CLIENT_ADDRESS = InetAddress(IPv4Address("192.0.2.10"), 41234)
"""The client address used unless one is given (a documentation address, RFC 5737)."""

MacroTable = Mapping[str, Mapping[str, str]]
"""Macro values per step: `{"connect": {"j": "mx.example.org"}, "mail": {...}}`."""


def normalize_macro_name(name: str) -> str:
    """`i` and `{i}` become `i`; longer names get braces (`daemon_name` -> `{daemon_name}`)."""
    if len(name) == 3 and name[0] == "{" and name[2] == "}":
        return name[1]
    if len(name) > 1 and not name.startswith("{"):
        return "{" + name + "}"
    return name


def _normalize_table(table: MacroTable | None) -> dict[Step, dict[str, str]]:
    out: dict[Step, dict[str, str]] = {}
    for key, values in (table or {}).items():
        step = key if isinstance(key, Step) else Step(key)
        if step not in MACRO_STAGES:
            raise ValueError(f"macros can be sent at {sorted(s.value for s in MACRO_STAGES)}, "
                             f"not at {step.value!r}")
        bucket = out.setdefault(step, {})
        for name, value in values.items():
            bucket[normalize_macro_name(name)] = value
    return out


@dataclasses.dataclass(frozen=True)
class Recipient:
    """An envelope recipient with the ESMTP parameters of its RCPT TO (`"NOTIFY=NEVER"`)."""

    address: str
    params: str = ""


@dataclasses.dataclass(frozen=True)
class ClientInfo:
    """The SMTP client of a connection: what connect, HELO and unknown commands carry.

    `address` None sends the "unknown" family (Postfix does this for unknown[unknown]);
    `helo` None sends no HELO. `unknown` lists SMTP commands the MTA does not know, sent
    after HELO. `macros` maps a step ("connect", "helo") to macro values.
    """

    hostname: str = "mail.example.net"
    address: InetAddress | UnixAddress | None = DEFAULT_CLIENT_ADDRESS
    helo: str | None = "mail.example.net"
    unknown: tuple[str, ...] = ()
    macros: MacroTable = dataclasses.field(default_factory=dict)
    default_macros: bool = True

    def macro_table(self) -> dict[Step, dict[str, str]]:
        table: dict[Step, dict[str, str]] = {}
        if self.default_macros:
            addr = "unknown" if self.address is None else str(getattr(self.address, "ip",
                                                                      self.address))
            table[Step.CONNECT] = {
                "j": "mx.example.org",
                "{daemon_name}": "pymilterkit",
                "{daemon_addr}": "127.0.0.1",
                "v": "pymilterkit",
                "_": f"{self.hostname} [{addr}]",
            }
        for step, values in _normalize_table(self.macros).items():
            table.setdefault(step, {}).update(values)
        return table


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The envelope of one message: sender and recipients with their ESMTP parameters.

    Addresses are sent in angle brackets (added if missing), as an MTA does. `macros` maps a
    step ("mail", "rcpt", "data", "eoh", "eom") to macro values; `queue_id` is macro `i`
    (derived from the message if not given).
    """

    sender: str = "sender@example.net"
    recipients: tuple[Recipient, ...] = (Recipient("rcpt@example.org"),)
    sender_params: str = ""
    macros: MacroTable = dataclasses.field(default_factory=dict)
    queue_id: str | None = None
    default_macros: bool = True

    @classmethod
    def of(
        cls,
        sender: str = "sender@example.net",
        recipients: Iterable[str | Recipient] | str = ("rcpt@example.org",),
        **kwargs: object,
    ) -> Envelope:
        """Build from plain strings: `Envelope.of("a@x", ["b@y", Recipient("c@z", "...")])`."""
        if isinstance(recipients, str):
            recipients = (recipients,)
        rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
        return cls(sender, rcpts, **kwargs)  # type: ignore[arg-type]

    def macro_table(self, raw: bytes, index: int) -> dict[Step, dict[str, str]]:
        table: dict[Step, dict[str, str]] = {}
        if self.default_macros:
            qid = self.queue_id or _queue_id(raw, index)
            table[Step.MAIL] = {"{mail_addr}": _strip_brackets(self.sender)}
            table[Step.RCPT] = {"i": qid}
            table[Step.DATA] = {"i": qid}
            table[Step.EOH] = {"i": qid}
            table[Step.EOM] = {"i": qid}
        for step, values in _normalize_table(self.macros).items():
            table.setdefault(step, {}).update(values)
        return table


def _queue_id(raw: bytes, index: int) -> str:
    return hashlib.sha1(raw + str(index).encode()).hexdigest()[:10].upper()


def _strip_brackets(address: str) -> str:
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def bracket(address: str) -> str:
    """An address as an MTA passes it to a milter: in angle brackets."""
    if address.startswith("<") and address.endswith(">"):
        return address
    return f"<{address}>"


def as_bytes(message: MessageInput) -> bytes:
    """The message as bytes (an EmailMessage is serialized with its own policy)."""
    if isinstance(message, email.message.EmailMessage):
        return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    if isinstance(message, str):
        return message.encode("utf-8", "surrogateescape")
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    raise TypeError(f"a message is bytes or an EmailMessage, not {type(message).__name__}")


_LINE = re.compile(rb"[^\n]*\n|[^\n]+\Z")
_HEADER_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def split_lines(raw: bytes) -> list[bytes]:
    """Lines including their terminator (LF or CRLF; the last one may have none)."""
    return _LINE.findall(raw)


def split_message(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers as (name, value after the colon, folds joined with LF) and the raw body.

    The header block ends at the first empty line, or at the first line that is neither a
    header nor a continuation (that line then starts the body, as in Postfix).
    """
    headers: list[tuple[bytes, bytes]] = []
    lines = split_lines(raw)
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip(b"\r\n")
        if stripped == b"":
            i += 1
            break
        match = _HEADER_START.match(stripped)
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + stripped)
            i += 1
            continue
        if match is None:
            break
        headers.append((match.group(1), stripped[match.end() :]))
        i += 1
    return headers, b"".join(lines[i:])


def crlf_body(body: bytes) -> bytes:
    """The body with every line ending as CRLF, as an MTA sends it to a milter."""
    return re.sub(rb"\r?\n", b"\r\n", body)


def header_value_for_milter(value: bytes, leading_space: bool) -> bytes:
    """Postfix removes one space after the colon unless HDR_LEADSPC was negotiated."""
    if not leading_space and value.startswith(b" "):
        return value[1:]
    return value


def chunks(body: bytes, size: int) -> list[bytes]:
    """The body in pieces of at most `size` bytes (none for an empty body)."""
    return [body[i : i + size] for i in range(0, len(body), size)]
