"""Removes executable attachments and records what it removed in a header.

A part is executable by its file name's extension (`.exe`, `.js`, `.scr`, ...) or by its content
type (`application/x-msdownload`, ...), at any depth of nested multiparts. Attached messages
(`message/rfc822`) and signed or encrypted parts are left alone (removing a part would break
the signature). What was removed is listed in `X-Removed-Attachments`; one the sender wrote is
deleted first, so the header can be trusted.

`on_message` edits `message.email` in place; pymilterkit sends the new body (`replace_body`)
and the header changes.

Run it:  pymilterkit run examples.attachments:Attachments --socket unix:/tmp/attachments.sock
"""

from __future__ import annotations

import email.message
import os
import sys
from email.message import EmailMessage
from typing import ClassVar

from typing_extensions import override

from pymilterkit import Actions, Message, Milter, MilterSession, Status

EXTENSIONS = frozenset((
    ".bat", ".cmd", ".com", ".cpl", ".dll", ".exe", ".hta", ".jar", ".js", ".jse", ".lnk",
    ".msi", ".pif", ".ps1", ".scr", ".vbe", ".vbs", ".wsf", ".wsh",
))
CONTENT_TYPES = frozenset((
    "application/hta", "application/java-archive", "application/x-dosexec",
    "application/x-executable", "application/x-ms-shortcut", "application/x-msdos-program",
    "application/x-msdownload", "application/x-sh", "application/vnd.microsoft.portable-executable",
))


def executable(part: EmailMessage) -> bool:
    """Whether `part` is an executable, by file name or content type."""
    name = (part.get_filename() or "").strip().lower()
    return part.get_content_type() in CONTENT_TYPES or os.path.splitext(name)[1] in EXTENSIONS


def remove_executables(container: EmailMessage) -> list[str]:
    """Remove the executable parts under `container`; the names of those removed."""
    if not container.is_multipart() or container.get_content_maintype() != "multipart":
        return []
    if container.get_content_subtype() in ("signed", "encrypted"):
        return []
    removed: list[str] = []
    kept: list[email.message.Message[str, str] | str] = []
    for part in container.iter_parts():
        assert isinstance(part, EmailMessage)
        if not part.is_multipart() and executable(part):
            removed.append(part.get_filename() or part.get_content_type())
        else:
            removed += remove_executables(part)
            kept.append(part)
    if len(kept) < len(list(container.iter_parts())):
        container.set_payload(kept)
    return removed


class Attachments(MilterSession):
    """Removes executable attachments; lists them in `X-Removed-Attachments`."""

    actions = Actions.CHANGE_BODY | Actions.ADD_HEADER | Actions.CHANGE_HEADER
    header: ClassVar[str] = "X-Removed-Attachments"
    max_message_size = 50 * 1024 * 1024

    @override
    def on_message(self, message: Message) -> Status:
        mail = message.email
        del mail[self.header]
        removed = remove_executables(mail)
        if removed:
            mail[self.header] = ", ".join(removed)
            self.log.info("removed %s", ", ".join(removed))
        return Status.CONTINUE


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    Milter(Attachments, socket, name="Attachments").run()
