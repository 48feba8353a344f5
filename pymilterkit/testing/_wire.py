"""The milter wire protocol (version 6): packet framing, command payloads, reply decoding.

Theory of operation
-------------------
Every packet is `u32 length (big endian) | 1 command byte | data`, the length counting the
command byte. Strings inside `data` are NUL-terminated. This module only turns values into
bytes and back; it knows nothing about sockets or about the order of commands (see
`_conversation.py`). Both the wire client and the in-process harness exchange exactly these
packets, which is what makes their results comparable.

Command letters are the MTA's (SMFIC_*), response letters the milter's (SMFIR_*); see
LIBMILTER.md section 1.3.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address

from .._errors import ProtocolError
from .._flags import Actions, ProtocolOpts, Stage, Status
from .._protocol import (
    ABORT,
    BY_METHOD,
    MACRO,
    OPTNEG,
    PROTOCOL_VERSION,
    QUIT,
    QUIT_NC,
    REPLY_LETTER,
    REPLYCODE,
)
from .._types import InetAddress, UnixAddress, decode
from .._validate import MAX_DATA
from ._results import (
    BodyReplaced,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    Modification,
    Progress,
    Quarantined,
    RecipientAdded,
    RecipientRemoved,
    SenderChanged,
)

__all__ = [
    "ABORT",
    "MACRO",
    "MAX_DATA",
    "OPTNEG",
    "PROTOCOL_VERSION",
    "QUIT",
    "QUIT_NC",
    "REPLYCODE",
    "Packet",
    "PacketReader",
    "decode_modification",
    "decode_optneg",
    "encode_connect",
    "encode_macros",
    "encode_optneg",
    "encode_packet",
    "split_strings",
]

MAX_PACKET = 1 << 20
"""Refuse packets claiming more than this: a sane milter never sends them."""

# MTA -> milter (SMFIC_*): the stages' commands come from the stage table
CONNECT, HELO, MAIL, RCPT = (BY_METHOD[m].command for m in ("on_connect", "on_helo", "on_mail",
                                                              "on_rcpt"))
DATA, UNKNOWN, HEADER, EOH = (BY_METHOD[m].command for m in ("on_data", "on_unknown",
                                                               "on_header", "on_eoh"))
BODY, BODYEOB = BY_METHOD["on_body"].command, BY_METHOD["on_eom"].command

# milter -> MTA (SMFIR_*); the answers to stages are `_protocol.REPLY_LETTER`
CONTINUE = REPLY_LETTER[Status.CONTINUE]
ADDRCPT = b"+"
DELRCPT = b"-"
ADDRCPT_PAR = b"2"
SHUTDOWN = b"4"
REPLBODY = b"b"
CHGFROM = b"e"
CONN_FAIL = b"f"
ADDHEADER = b"h"
INSHEADER = b"i"
SETSYMLIST = b"l"
CHGHEADER = b"m"
PROGRESS = b"p"
QUARANTINE = b"q"

_U32 = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")

Packet = tuple[bytes, bytes]
"""(command letter, data)."""


def encode_packet(cmd: bytes, data: bytes = b"") -> bytes:
    """Frame one packet."""
    if len(cmd) != 1:
        raise ValueError(f"a command is one byte, got {cmd!r}")
    return _U32.pack(len(data) + 1) + cmd + data


class PacketReader:
    """Incremental decoder: feed bytes, take complete packets."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a packet."""
        return len(self._buffer)

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None if more bytes are needed."""
        if len(self._buffer) < 4:
            return None
        (size,) = _U32.unpack_from(self._buffer)
        if size == 0:
            raise ProtocolError("malformed packet: length 0 (no command byte)")
        if size > MAX_PACKET:
            raise ProtocolError(f"malformed packet: announced length {size} is absurd")
        if len(self._buffer) < 4 + size:
            return None
        cmd = bytes(self._buffer[4:5])
        data = bytes(self._buffer[5 : 4 + size])
        del self._buffer[: 4 + size]
        return cmd, data


def split_strings(data: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings of a packet's data (the last NUL is required)."""
    if not data.endswith(b"\0"):
        raise ProtocolError(f"malformed {what} packet: data not NUL-terminated ({data[:60]!r})")
    return data[:-1].split(b"\0")


def cstr(value: bytes) -> bytes:
    """One NUL-terminated string; refuses embedded NULs (they would split the field)."""
    if b"\0" in value:
        raise ValueError(f"a protocol string must not contain NUL: {value[:60]!r}")
    return value + b"\0"


# -- MTA -> milter payloads ---------------------------------------------------------------


def encode_optneg(version: int, actions: int, protocol: int) -> bytes:
    """Data of the MTA's OPTNEG packet."""
    return _OPTNEG.pack(version, actions, protocol)


def decode_optneg(data: bytes) -> tuple[int, Actions, ProtocolOpts, dict[Stage, tuple[str, ...]]]:
    """The milter's OPTNEG reply: version, actions, protocol options, requested macros."""
    if len(data) < _OPTNEG.size:
        raise ProtocolError(f"malformed negotiation reply: {len(data)} bytes, need 12")
    version, actions, protocol = _OPTNEG.unpack_from(data)
    macros: dict[Stage, tuple[str, ...]] = {}
    rest = data[_OPTNEG.size :]
    while rest:
        if len(rest) < 5:
            raise ProtocolError("malformed macro list in negotiation reply")
        (where,) = _U32.unpack_from(rest)
        end = rest.find(b"\0", 4)
        if end < 0:
            raise ProtocolError("macro list in negotiation reply is not NUL-terminated")
        try:
            stage = Stage(where)
        except ValueError:
            raise ProtocolError(
                f"negotiation reply asks for macros at unknown stage {where}"
            ) from None
        macros[stage] = tuple(decode(rest[4:end]).split())
        rest = rest[end + 1 :]
    return version, Actions(actions), ProtocolOpts(protocol), macros


def encode_connect(hostname: bytes, address: InetAddress | UnixAddress | None) -> bytes:
    """Data of CONNECT: host name, family (4, 6, L, U), port, address."""
    head = cstr(hostname)
    if address is None:
        return head + b"U"
    if isinstance(address, UnixAddress):
        return head + b"L" + struct.pack(">H", 0) + cstr(address.path.encode("utf-8",
                                                                          "surrogateescape"))
    family = b"6" if isinstance(address.ip, IPv6Address) else b"4"
    return head + family + struct.pack(">H", address.port) + cstr(str(address.ip).encode())


def decode_connect(data: bytes) -> tuple[bytes, InetAddress | UnixAddress | None]:
    """The inverse of `encode_connect`, checked the way libmilter checks it."""
    end = data.find(b"\0")
    if end < 0 or end + 1 >= len(data):
        raise ProtocolError("malformed connect packet")
    host, family = data[:end], data[end + 1 : end + 2]
    if family == b"U":
        return host, None
    rest = data[end + 2 :]
    if len(rest) < 3 or not rest.endswith(b"\0"):
        raise ProtocolError("malformed connect packet: no port or address")
    port = struct.unpack(">H", rest[:2])[0]
    text = rest[2:-1].split(b"\0", 1)[0]
    try:
        if family == b"4":
            return host, InetAddress(IPv4Address(text.decode("ascii")), port)
        if family == b"6":
            raw = text.decode("ascii")
            if raw[:5].lower() == "ipv6:":
                raw = raw[5:]
            return host, InetAddress(IPv6Address(raw), port)
    except ValueError as exc:
        raise ProtocolError(f"malformed connect address {text!r}: {exc}") from None
    if family == b"L":
        return host, UnixAddress(decode(text))
    raise ProtocolError(f"unknown address family {family!r} in connect packet")


def encode_macros(cmd: bytes, macros: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Data of a MACRO packet for command `cmd`."""
    return cmd + b"".join(cstr(name) + cstr(value) for name, value in macros)


def encode_argv(args: Sequence[bytes]) -> bytes:
    """Data of MAIL and RCPT: the address, then each ESMTP argument."""
    return b"".join(cstr(arg) for arg in args)


# -- milter -> MTA -----------------------------------------------------------------------


def decode_modification(cmd: bytes, data: bytes) -> Modification:
    """A modification packet of the end-of-message phase as a typed value."""
    if cmd == REPLBODY:
        return BodyReplaced(data)
    if cmd == PROGRESS:
        return Progress()
    if cmd not in _MODIFICATIONS:
        raise ProtocolError(f"unknown response {cmd!r} from the milter")
    what, indexed, least, most = _MODIFICATIONS[cmd]
    index = 0
    if indexed:
        if len(data) < 4:
            raise ProtocolError(f"malformed {what} packet: no index")
        (index,) = _U32.unpack_from(data)
        data = data[4:]
    parts = [decode(part) for part in split_strings(data, what)]
    if not least <= len(parts) <= most:
        raise ProtocolError(f"malformed {what} packet: {len(parts)} strings")
    if cmd == ADDHEADER:
        return HeaderAdded(parts[0], parts[1])
    if cmd == INSHEADER:
        return HeaderInserted(index, parts[0], parts[1])
    if cmd == CHGHEADER:  # Sendmail and Postfix treat index 0 as 1; an empty value deletes
        if not parts[1]:
            return HeaderDeleted(parts[0], max(index, 1))
        return HeaderChanged(parts[0], max(index, 1), parts[1])
    if cmd == CHGFROM:
        return SenderChanged(parts[0], parts[1] if len(parts) == 2 else None)
    if cmd in (ADDRCPT, ADDRCPT_PAR):
        return RecipientAdded(parts[0], parts[1] if len(parts) == 2 else None)
    if cmd == DELRCPT:
        return RecipientRemoved(parts[0])
    return Quarantined(parts[0])


_MODIFICATIONS = {  # what the packet is called, whether an index leads, how many strings follow
    ADDHEADER: ("add header", False, 2, 2),
    INSHEADER: ("insert header", True, 2, 2),
    CHGHEADER: ("change header", True, 2, 2),
    CHGFROM: ("change sender", False, 1, 2),
    ADDRCPT: ("add recipient", False, 1, 1),
    ADDRCPT_PAR: ("add recipient", False, 1, 2),
    DELRCPT: ("remove recipient", False, 1, 1),
    QUARANTINE: ("quarantine", False, 1, 1 << 30),
}


def macro_pairs(values: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Macro names and values as bytes, in the given order."""
    return [
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        for name, value in values.items()
    ]
