"""The whole message of a whole-message filter: collected, spooled past a threshold, editable.

`MessageBuffer` collects what the MTA sends (headers with their exact leading space, then body
chunks) into a `tempfile.SpooledTemporaryFile`: in memory up to the threshold, past it in an
unnamed temporary file (0600, gone when closed or when the process dies), so memory per session
is bounded whatever the message size. Past `max_size` nothing more is kept and the message is
marked too big. `Message` is what `on_message` receives: the envelope, the headers as received,
the bytes as the MTA has them, and `email`, parsed on first use. `Message.edits()` compares the
parsed message with what the filter left and answers with header actions and, if the body
changed, the new body.
"""

from __future__ import annotations

import io
import operator
import re
import tempfile
from collections.abc import Callable, Sequence
from email import policy as email_policy
from email.generator import BytesGenerator
from email.headerregistry import BaseHeader, HeaderRegistry, UnstructuredHeader
from email.message import EmailMessage
from email.parser import BytesParser, Parser
from typing import IO, Any, BinaryIO, cast

from typing_extensions import override

from ._edits import HeaderEdit, header_edits

__all__ = ["DEFAULT_SPOOL_THRESHOLD", "Message", "MessageBuffer"]

DEFAULT_SPOOL_THRESHOLD = 1024 * 1024
"""Bytes of a message held in memory before it goes to a temporary file."""


class _HeaderClasses(HeaderRegistry):
    """The standard header registry, making each header class once: the standard one makes a
    new class for every header it parses or stores (a quarter of parsing a small message)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[type, type] = {}

    def __reduce__(self) -> tuple[type[_HeaderClasses], tuple[()]]:
        # A message pickles or copies its policy: the classes made here cannot be pickled (a
        # header object itself pickles as the standard one does, by its bases).
        return _HeaderClasses, ()

    def __getitem__(self, name: str) -> type[BaseHeader]:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._made.get(kind)
        if made is None:  # as HeaderRegistry.__getitem__ makes it; at most one per kind
            made = self._made[kind] = type("_" + kind.__name__, (kind, self.base_class), {})
        return made


_PARSE = email_policy.default.clone(header_factory=_HeaderClasses())
"""`email.policy.default`, with the header classes made once (what `Message.email` has)."""
_WIRE = _PARSE.clone(linesep="\n")
_BYTES = _PARSE.clone(linesep="\r\n")
_STRUCTURED = frozenset(
    name for name, kind in HeaderRegistry().registry.items()
    if not issubclass(kind, UnstructuredHeader)
)
"""Header names the policy parses by a grammar of their own (addresses, dates, parameters)."""


class MessageBuffer:
    """The message being collected for one session; `close()` frees memory and file at once."""

    def __init__(
        self, threshold: int = DEFAULT_SPOOL_THRESHOLD, directory: str | None = None,
        max_size: int | None = None,
    ) -> None:
        self._spool: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by close())
            max_size=threshold, mode="w+b", dir=directory
        )
        self._threshold = threshold
        self.limit = max_size
        """Bytes past which nothing more is kept (None: no limit)."""
        self.headers: list[tuple[str, str]] = []
        self.size = 0
        self.too_big = False
        self._body_at = -1

    def _write(self, data: bytes) -> None:
        if self.too_big:
            return
        if self.limit is not None and self.size + len(data) > self.limit:
            self.too_big = True
            self._spool.truncate(0)
            return
        self._spool.write(data)
        self.size += len(data)

    def header(self, name: str, value: str) -> None:
        """One header as received; `value` keeps its leading space (HDR_LEADSPC)."""
        self.headers.append((name, value))
        line = f"{name}:{value}".replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n"
        self._write(line.encode("utf-8", "surrogateescape"))

    def end_of_headers(self) -> None:
        """The empty line between headers and body."""
        self._write(b"\r\n")
        self._body_at = self.size

    def body(self, chunk: bytes) -> None:
        """One body chunk, byte for byte."""
        if self._body_at < 0:
            self.end_of_headers()
        self._write(chunk)

    @property
    def on_disk(self) -> bool:
        """True once the message went past the threshold into a temporary file.

        (The spool rolls over when its position passes the threshold; only appends move it.)
        """
        return self.size > self._threshold

    def view(self) -> BinaryIO:
        """A reader of the collected bytes from the start, with a position of its own."""
        if self.on_disk:
            # a second open file description of the same unnamed file: its own offset; what
            # the spool still buffers must reach the file first (whole chunks from Python 3.14,
            # whose buffer is 128 KiB: a message read back without its last chunks)
            self._spool.flush()
            fd = self._spool.fileno()
            return cast(BinaryIO, open(f"/proc/self/fd/{fd}", "rb"))
        return io.BytesIO(self.data())

    def data(self) -> bytes:
        """The collected bytes (read whole: for a message still in memory)."""
        end = self._spool.tell()
        self._spool.seek(0)
        data = self._spool.read()
        self._spool.seek(end)
        return data

    @property
    def body_start(self) -> int:
        """Where the body starts (after the empty line), or -1 before the end of headers."""
        return self._body_at

    def body_bytes(self) -> bytes:
        """The body as received (read back from the spool; empty if there was none)."""
        if self._body_at < 0:
            return b""
        with self.view() as reader:
            reader.seek(self._body_at)
            return reader.read()

    def close(self) -> None:
        """Free the memory and remove the temporary file (idempotent)."""
        self._spool.close()


class Message:
    """One whole message, as `on_message` gets it (see the guide on content filters)."""

    def __init__(
        self, buffer: MessageBuffer, sender: str, recipients: Sequence[str],
        queue_id: str | None,
    ) -> None:
        self._buffer = buffer
        self.sender = sender
        """The envelope sender (MAIL FROM), as the MTA gave it."""
        self.recipients = tuple(recipients)
        """The envelope recipients (RCPT TO) accepted so far (by the MTA and the filter)."""
        self.queue_id = queue_id
        """The MTA's queue id (macro `i`), if it sent one."""
        self._email: EmailMessage | None = None
        self._parsed_headers: list[tuple[str, object]] = []
        self._shape: list[object] = []

    @property
    def headers(self) -> Sequence[tuple[str, str]]:
        """The header fields as received: names, and values with their leading space."""
        return tuple(self._buffer.headers)

    @property
    def size(self) -> int:
        """Bytes of the message as the MTA has it (headers, empty line, body)."""
        return self._buffer.size

    def open(self) -> BinaryIO:
        """The message bytes as the MTA has them (CRLF line ends), from the start."""
        return self._buffer.view()

    @property
    def email(self) -> EmailMessage:
        """The message parsed by the standard library, on first use; edit it in place."""
        if self._email is None:
            self._email = _parse(self)
            self._parsed_headers = list(self._email.raw_items())
            self._shape = _shape(self._email)
        return self._email

    def edits(self) -> tuple[list[HeaderEdit], bytes | None]:
        """Header actions and the new body (None: unchanged) that make the MTA's copy `email`.

        Nothing is computed for a message whose `email` was never used.
        """
        if self._email is None:
            return [], None
        parsed, received = self._parsed_headers, self._buffer.headers
        same = len(parsed) == len(received) and all(
            a[0].lower() == b[0].lower() for a, b in zip(parsed, received, strict=True)
        )  # else the parser read the header block otherwise: compare its own values
        before = received if same else [(name, cast(str, value)) for name, value in parsed]
        # A header the filter left alone keeps its parsed value object, but equal short
        # strings are one object: its name and its place among its namesakes tell it apart.
        kept: dict[tuple[str, int], list[str]] = {}
        for (name, value), (_, text) in zip(parsed, before, strict=True):
            kept.setdefault((name.lower(), id(value)), []).append(text)
        after = []
        for name, value in self._email.raw_items():
            texts = kept.get((name.lower(), id(value)))
            after.append((name, texts.pop(0) if texts else _wire(name, value)))
        shape = _shape(self._email)
        if len(shape) == len(self._shape) and all(map(operator.is_, shape, self._shape)):
            return header_edits(before, after), None  # nothing under the top headers replaced
        body = _body(self._email)
        original = self._buffer.body_bytes()
        if body == original or body == _body(_parse(self)):
            return header_edits(before, after), None
        return header_edits(before, after), body


def _shape(message: EmailMessage) -> list[object]:
    """The objects the body is made of (payloads, parts' headers, preambles ...): an edit
    replaces some, so the same objects in the same order mean an untouched body."""
    objects: list[object] = []
    for part in message.walk():
        state = vars(part)
        payload = state.get("_pmk_body", state.get("_payload"))  # a `_Leaf`: read or not
        objects += payload if isinstance(payload, list) else [payload]
        objects += [part, part.preamble, part.epilogue, state.get("_charset"),
                    state.get("_default_type")]
        if part is not message:
            objects += state.get("_headers", ())
    return objects


def _wire(name: str, value: object) -> str:
    """A header value as a milter action sends it: leading space, folded with LF + space."""
    text = str(value)
    if (
        len(text) > 0 and len(name) + len(text) < 77  # one line, as the policy keeps it
        and text.isascii() and text.isprintable() and text == text.strip() and "=?" not in text
        and name.lower() not in _STRUCTURED
    ):  # what folding would give back unchanged, for a short unstructured value (the most
        return " " + text  # common edit: a header added) without parsing it again
    folded: str = _WIRE.fold(name, cast(str, value))  # a str or a header object
    return folded[len(name) + 1 :].rstrip("\n")


def _body(message: EmailMessage) -> bytes:
    """The body as the standard library writes it (CRLF), without the header block."""
    out = io.BytesIO()
    BytesGenerator(out, policy=_BYTES).flatten(message)
    raw = out.getvalue()
    if raw.startswith(b"\r\n"):  # no header at all
        return raw[2:]
    cut = raw.find(b"\r\n\r\n")
    return raw[cut + 4 :] if cut >= 0 else b""


def _parse(message: Message) -> EmailMessage:
    """`message` parsed as `BytesParser` parses its bytes.

    A message whose top part is a leaf (not multipart/*, message/*) gets its header block
    parsed and its body set as it is: the parser would join the body's lines into the same
    text, one line at a time (at 1 MiB most of the parse, and the lines' objects are most of
    its memory). Any other message, or a header block the parser reads otherwise (a defect),
    is parsed whole: from its bytes when in memory, else from its file, read as text without
    translating line ends (as `parsebytes` reads them: the same payloads either way).
    """
    buffer, at = message._buffer, message._buffer.body_start
    parser = BytesParser(policy=_LAZY if buffer.on_disk else _PARSE)
    with message.open() as reader:
        if at >= 0:
            head = parser.parsebytes(reader.read(at))
            if not head.defects and _leaf(head):
                if isinstance(head, _Leaf):  # past the threshold: read when first used
                    head._pmk_later(lambda: buffer.body_bytes().decode("ascii", "surrogateescape"))
                else:
                    head.set_payload(reader.read().decode("ascii", "surrogateescape"))
                return head
            reader.seek(0)
            parser = BytesParser(policy=_PARSE)
        if not buffer.on_disk:
            return parser.parsebytes(reader.read())
        text = io.TextIOWrapper(reader, "ascii", "surrogateescape", newline="")
        return Parser(policy=_PARSE).parse(text)


_PARTS = ("multipart", "message")
"""Main content types whose body the parser reads into parts."""
_MAIN_TYPE = re.compile(r"[ \t]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)/")


def _leaf(head: EmailMessage) -> bool:
    """Whether the parsed header block `head` is of a leaf (not multipart/*, message/*).

    Read off the first Content-Type's raw value when it starts with a plain type (the policy
    parses the header at each look: 1 in 40 of a 1 KiB message's cost), else as the parser
    reads it; none: text/plain.
    """
    for name, value in head.raw_items():
        if name.lower() == "content-type":
            match = _MAIN_TYPE.match(value)
            if match is None:
                return head.get_content_maintype() not in _PARTS
            return match.group(1).lower() not in _PARTS
    return True


class _Leaf(EmailMessage):
    """A single-part message past the spool threshold: its body is read from the temporary
    file when first used, so a filter that parses it and never reads the body holds only its
    headers (16 messages of 20 MiB at once: see docs/performance.md).

    Foreign internals: `email.message.Message` keeps the body in the attribute `_payload`,
    which its own methods read and write directly (`set_charset`, `_make_multipart`, ...), not
    only through `get_payload`/`set_payload`. `_payload` is made a property here: the first read
    reads the body; a write replaces it. `tests/unit/test_message.py` checks that every way of
    reading and editing a message gives what it gives on the message parsed whole.
    """

    @property
    def _payload(self) -> Any:
        state = self.__dict__
        read = state.get("_pmk_read")
        if read is not None:
            state["_pmk_read"] = None
            state["_pmk_text"] = read()
        return state.get("_pmk_text")

    @_payload.setter
    def _payload(self, value: Any) -> None:
        self.__dict__.update(_pmk_read=None, _pmk_text=value, _pmk_body=value)

    def _pmk_later(self, read: Callable[[], str]) -> None:
        """The body is what `read()` returns, read when first used."""
        self.__dict__.update(_pmk_read=read, _pmk_text=None, _pmk_body=read)

    @override
    def is_multipart(self) -> bool:
        return self.__dict__.get("_pmk_read") is None and super().is_multipart()

    def __getstate__(self) -> dict[str, Any]:
        """A copy or a pickle holds the body itself (read now), not the way to read it."""
        text = self._payload
        return dict(self.__dict__, _pmk_body=text)


_LAZY = _PARSE.clone(message_factory=_Leaf)
