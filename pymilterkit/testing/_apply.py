"""Apply a result's modifications to the original message: what the MTA would deliver."""

from __future__ import annotations

import dataclasses

from .._flags import Status
from ._envelope import Envelope, MessageInput, Recipient, as_bytes, split_lines
from ._results import (
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    MessageResult,
    RecipientAdded,
    RecipientRemoved,
)

__all__ = ["apply_envelope", "apply_modifications"]


def _header_lines(raw: bytes) -> tuple[list[list[bytes]], bytes, bytes]:
    """Header fields (each a list of its physical lines), the separator line, the body."""
    fields: list[list[bytes]] = []
    lines = split_lines(raw)
    i = 0
    separator = b""
    while i < len(lines):
        line = lines[i]
        if line.rstrip(b"\r\n") == b"":
            separator = line
            i += 1
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif b":" in line:
            fields.append([line])
        else:
            break
        i += 1
    return fields, separator, b"".join(lines[i:])


_OWN_RECEIVED = [b"\0"]
"""Where the MTA's own Received: header stands (first; the filter never sees it): insert
indexes count it, change and delete indexes do not (Postfix's cleanup_milter.c, Sendmail)."""


def _field_name(field: list[bytes]) -> bytes:
    return field[0].split(b":", 1)[0].strip().lower()


def _render(name: str, value: str, eol: bytes, leading_space: bool) -> list[bytes]:
    raw = value.encode("utf-8", "surrogateescape")
    sep = b":" if leading_space else b": "
    text = name.encode("utf-8", "surrogateescape") + sep + raw
    return [line + eol for line in text.replace(b"\r\n", b"\n").split(b"\n")]


def _find(fields: list[list[bytes]], name: str, index: int) -> int | None:
    wanted = name.encode("utf-8", "surrogateescape").lower()
    seen = 0
    for position, field in enumerate(fields):
        if _field_name(field) == wanted:
            seen += 1
            if seen == index:
                return position
    return None


def apply_modifications(
    original: MessageInput, result: MessageResult, *, leading_space: bool = False
) -> bytes:
    """The message after the result's header and body changes, as the MTA would deliver it.

    Headers are added at the end, inserted at their 0-based position among the MTA's headers
    (which begin with its own Received:, not shown: 0 is above it, 1 above the first header
    the filter saw), changed or deleted by name and 1-based index (a change of a missing header
    appends it, as sendmail and Postfix do); body chunks replace the body. Line endings
    follow the original (CRLF or LF). Without `leading_space` (HDR_LEADSPC not negotiated) the
    MTA puts one space after the colon.
    Nothing is applied to a message the MTA would not deliver (REJECT, TEMPFAIL, DISCARD):
    the original comes back unchanged.
    """
    raw = as_bytes(original)
    if result.status not in (Status.CONTINUE, Status.ACCEPT):
        return raw
    fields, separator, body = _header_lines(raw)
    fields.insert(0, _OWN_RECEIVED)
    eol = b"\r\n" if b"\r\n" in raw.split(b"\n", 1)[0] + b"\n" else b"\n"
    if not separator and body:  # no empty line and no body: the MTA adds none either
        separator = eol
    for mod in result.modifications:
        if isinstance(mod, HeaderAdded):
            fields.append(_render(mod.name, mod.value, eol, leading_space))
        elif isinstance(mod, HeaderInserted):
            fields.insert(min(mod.index, len(fields)),
                          _render(mod.name, mod.value, eol, leading_space))
        elif isinstance(mod, HeaderChanged):
            position = _find(fields, mod.name, mod.index)
            new = _render(mod.name, mod.value, eol, leading_space)
            if position is None:
                fields.append(new)
            else:
                fields[position] = new
        elif isinstance(mod, HeaderDeleted):
            position = _find(fields, mod.name, mod.index)
            if position is not None:
                del fields[position]
    new_body = result.new_body
    if new_body is not None:
        body = new_body if eol == b"\r\n" else new_body.replace(b"\r\n", b"\n")
    return b"".join(
        line for field in fields if field is not _OWN_RECEIVED for line in field
    ) + separator + body


def apply_envelope(envelope: Envelope, result: MessageResult) -> Envelope:
    """The envelope after the result's sender and recipient changes.

    Recipients the milter refused at RCPT are dropped; removed recipients are matched with
    or without angle brackets.
    """
    sender, params = envelope.sender, envelope.sender_params
    change = result.sender_change
    if change is not None:
        sender, params = change.sender.strip("<>"), change.params or ""
    refused = {r.recipient for r in result.recipients if not r.accepted}
    rcpts = [r for r in envelope.recipients if r.address not in refused]
    for mod in result.modifications:
        if isinstance(mod, RecipientAdded):
            rcpts.append(Recipient(mod.recipient.strip("<>"), mod.params or ""))
        elif isinstance(mod, RecipientRemoved):
            gone = mod.recipient.strip("<>")
            rcpts = [r for r in rcpts if r.address.strip("<>") != gone]
    return dataclasses.replace(envelope, sender=sender, sender_params=params,
                               recipients=tuple(rcpts))
