"""Typed results of a conversation with a milter: replies, modifications, verdicts.

The harness and the wire client return exactly these values, built by the same code from the
same packets, so a result from one can be compared with `==` to a result from the other.
Strings are decoded as UTF-8 with surrogateescape (as the session API does); bodies are bytes.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
from collections.abc import Mapping
from typing import TypeVar

from .._flags import Actions, ProtocolOpts, Stage, Status
from .._types import decode

__all__ = [
    "Answer",
    "BodyReplaced",
    "ConnectionResult",
    "HeaderAdded",
    "HeaderChanged",
    "HeaderDeleted",
    "HeaderInserted",
    "MessageResult",
    "Modification",
    "Negotiation",
    "Progress",
    "Quarantined",
    "RecipientAdded",
    "RecipientRemoved",
    "RecipientResult",
    "Reply",
    "SenderChanged",
    "Step",
]


_M = TypeVar("_M")


class Step(enum.StrEnum):
    """A step of the conversation, named after the MTA's command (a `str`: "mail", ...)."""

    NEGOTIATE = "negotiate"
    CONNECT = "connect"
    HELO = "helo"
    UNKNOWN = "unknown"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    EOH = "eoh"
    BODY = "body"
    EOM = "eom"
    ABORT = "abort"
    QUIT = "quit"
    QUIT_NC = "quit_nc"


_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])([ -])(?:([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |\Z))?")


@dataclasses.dataclass(frozen=True)
class Reply:
    """An SMTP reply as the client would see it: code, enhanced code, text lines.

    `custom` is False for the MTA's default text (the milter answered a bare REJECT/TEMPFAIL
    without `set_reply`). Lines have `%%` turned into `%`, as Postfix does.
    """

    code: str
    xcode: str | None
    lines: tuple[str, ...]
    custom: bool = True

    @classmethod
    def parse(cls, raw: bytes) -> Reply:
        """Parse the text of a SMFIR_REPLYCODE packet (possibly multi-line, CRLF-separated)."""
        text = decode(raw)
        code, xcode = text[:3], None
        lines: list[str] = []
        for line in text.split("\r\n"):
            match = _REPLY_LINE.match(line)
            if match is None:
                lines.append(line)
                continue
            code = match.group(1)
            if match.group(3):
                xcode = match.group(3)
            lines.append(line[match.end() :])
        return cls(code, xcode, tuple(_unpercent(line) for line in lines), True)

    @classmethod
    def default(cls, status: Status) -> Reply:
        """Postfix's reply for a bare REJECT or TEMPFAIL."""
        if status is Status.TEMPFAIL:
            return cls("451", "4.7.1", ("Service unavailable - try again later",), False)
        return cls("550", "5.7.1", ("Command rejected",), False)

    def __str__(self) -> str:
        prefix = f"{self.code}{{sep}}{self.xcode} " if self.xcode else f"{self.code}{{sep}}"
        lines = self.lines or ("",)
        out = []
        for number, line in enumerate(lines, 1):
            sep = " " if number == len(lines) else "-"
            out.append(prefix.format(sep=sep) + line)
        return "\r\n".join(out)


def _unpercent(line: str) -> str:
    # Postfix: "%%" becomes "%", a single "%" is dropped.
    out = []
    chars = iter(line)
    for ch in chars:
        if ch == "%":
            ch = next(chars, "")
        out.append(ch)
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class HeaderAdded:
    """A header appended at the end of the header block (smfi_addheader)."""

    name: str
    value: str


@dataclasses.dataclass(frozen=True)
class HeaderInserted:
    """A header inserted at 0-based position `index` of the header block (smfi_insheader)."""

    index: int
    name: str
    value: str


@dataclasses.dataclass(frozen=True)
class HeaderChanged:
    """The `index`-th (1-based) header called `name` gets a new value (smfi_chgheader)."""

    name: str
    index: int
    value: str


@dataclasses.dataclass(frozen=True)
class HeaderDeleted:
    """The `index`-th (1-based) header called `name` is removed (smfi_chgheader with NULL)."""

    name: str
    index: int


@dataclasses.dataclass(frozen=True)
class SenderChanged:
    """A new envelope sender, with its ESMTP parameters or None (smfi_chgfrom)."""

    sender: str
    params: str | None = None


@dataclasses.dataclass(frozen=True)
class RecipientAdded:
    """A new envelope recipient, with ESMTP parameters or None (smfi_addrcpt[_par])."""

    recipient: str
    params: str | None = None


@dataclasses.dataclass(frozen=True)
class RecipientRemoved:
    """An envelope recipient removed (smfi_delrcpt)."""

    recipient: str


@dataclasses.dataclass(frozen=True)
class BodyReplaced:
    """New body content; several in one result are concatenated (smfi_replacebody)."""

    body: bytes


@dataclasses.dataclass(frozen=True)
class Quarantined:
    """The message is put on hold with a reason (smfi_quarantine)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Progress:
    """The milter asked for more time (smfi_progress)."""


Modification = (
    HeaderAdded
    | HeaderInserted
    | HeaderChanged
    | HeaderDeleted
    | SenderChanged
    | RecipientAdded
    | RecipientRemoved
    | BodyReplaced
    | Quarantined
    | Progress
)


@dataclasses.dataclass(frozen=True)
class Answer:
    """The milter's answer to one command.

    `status` is `Status.NOREPLY` when the command was sent without waiting (a no-reply stage,
    or abort); `detail` says what was sent (a header name, a recipient, a chunk size).
    """

    step: Step
    status: Status
    reply: Reply | None = None
    modifications: tuple[Modification, ...] = ()
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class RecipientResult:
    """What the milter answered to one RCPT TO (NOREPLY if it was not asked)."""

    recipient: str
    params: str
    status: Status
    reply: Reply | None = None

    @property
    def accepted(self) -> bool:
        return self.status not in (Status.REJECT, Status.TEMPFAIL)


@dataclasses.dataclass(frozen=True)
class Negotiation:
    """What was offered to the milter and what it asked for."""

    version: int
    actions: Actions
    protocol: ProtocolOpts
    macros: Mapping[Stage, tuple[str, ...]]
    offered_actions: Actions
    offered_protocol: ProtocolOpts

    def sends(self, flag: ProtocolOpts) -> bool:
        """True unless the milter negotiated the NO_* stage `flag` away."""
        return not self.protocol & flag


@dataclasses.dataclass(frozen=True)
class MessageResult:
    """The verdict on one message and everything the milter did to it.

    `status` is the answer that decided the message: CONTINUE or ACCEPT (delivered), REJECT,
    TEMPFAIL or DISCARD; `stage` is where it was given (`Step.EOM` for a message that went all
    the way). A connection-level verdict (connect/HELO) is reported on every message of the
    connection. `reply` is set for REJECT/TEMPFAIL (the milter's text, or the MTA's default).
    """

    status: Status
    stage: Step
    reply: Reply | None
    modifications: tuple[Modification, ...]
    recipients: tuple[RecipientResult, ...]
    answers: tuple[Answer, ...]

    original: bytes = dataclasses.field(default=b"", compare=False, repr=False)
    """The message as the MTA sent it to the milter."""
    delivered: bytes = dataclasses.field(default=b"", compare=False, repr=False)
    """The message the MTA would deliver: `original` with every modification applied (empty
    when the MTA would not deliver it: REJECT, TEMPFAIL, DISCARD)."""

    def diff(self) -> str:
        """A unified diff of `original` against `delivered` (empty: no change)."""
        before, after = (
            m.decode("utf-8", "surrogateescape").replace("\r\n", "\n").splitlines()
            for m in (self.original, self.delivered)
        )
        lines = difflib.unified_diff(before, after, "original", "delivered", lineterm="")
        return "".join(line + "\n" for line in lines)

    def _of(self, kind: type[_M]) -> tuple[_M, ...]:
        return tuple(m for m in self.modifications if isinstance(m, kind))

    @property
    def headers_added(self) -> tuple[HeaderAdded, ...]:
        return self._of(HeaderAdded)

    @property
    def headers_inserted(self) -> tuple[HeaderInserted, ...]:
        return self._of(HeaderInserted)

    @property
    def headers_changed(self) -> tuple[HeaderChanged, ...]:
        return self._of(HeaderChanged)

    @property
    def headers_deleted(self) -> tuple[HeaderDeleted, ...]:
        return self._of(HeaderDeleted)

    @property
    def sender_change(self) -> SenderChanged | None:
        """The last change of the envelope sender, if any."""
        changes = self._of(SenderChanged)
        return changes[-1] if changes else None

    @property
    def recipients_added(self) -> tuple[RecipientAdded, ...]:
        return self._of(RecipientAdded)

    @property
    def recipients_removed(self) -> tuple[RecipientRemoved, ...]:
        return self._of(RecipientRemoved)

    @property
    def new_body(self) -> bytes | None:
        """The replacement body (all chunks joined), or None if the body was not replaced."""
        chunks = self._of(BodyReplaced)
        return b"".join(c.body for c in chunks) if chunks else None

    @property
    def quarantine_reason(self) -> str | None:
        reasons = self._of(Quarantined)
        return reasons[-1].reason if reasons else None

    @property
    def progress_count(self) -> int:
        return len(self._of(Progress))

    def header(self, name: str) -> str | None:
        """The value of the first added or inserted header called `name` (case-insensitive)."""
        for mod in self.modifications:
            if isinstance(mod, (HeaderAdded, HeaderInserted)) and mod.name.lower() == name.lower():
                return mod.value
        return None


@dataclasses.dataclass(frozen=True)
class ConnectionResult:
    """One milter connection: the negotiation, connection-level answers, each message.

    `errors` (harness only, not compared) lists the exceptions stage methods raised, which the
    runner would have logged and answered with its error status.
    """

    negotiation: Negotiation
    connect: Answer | None
    helo: Answer | None
    unknown: tuple[Answer, ...]
    messages: tuple[MessageResult, ...]
    errors: tuple[tuple[str, BaseException], ...] = dataclasses.field(
        default=(), compare=False
    )
