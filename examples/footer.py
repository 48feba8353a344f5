"""A MIME-aware footer (disclaimer): appends a footer to every text part of a message.

The filter collects the headers (`on_header`) and the body (`on_body`), and at end of message
(`on_eom`) parses the whole message with the standard `email` package (`policy=default`):

* every `text/plain` part gets `FOOTER` appended, every `text/html` part gets it as a
  paragraph before `</body>` (or at the end), in single-part and multipart messages alike;
* attachments (`Content-Disposition: attachment`), attached messages (`message/rfc822`) and
  signed or encrypted messages (`multipart/signed`, `multipart/encrypted`) are left alone;
* each part is re-encoded through `email`'s API: a base64 or quoted-printable part stays
  base64 or quoted-printable, its charset is kept when it can hold the footer (else UTF-8),
  and its other `Content-*` headers (disposition, id, language...) are kept;
* the new body goes back to the MTA with `replace_body`; when the top-level `Content-Type` or
  `Content-Transfer-Encoding` had to change (a single-part message whose encoding changed),
  those headers are changed with `change_header` (and `MIME-Version: 1.0` added if missing).

Messages larger than `max_size` bytes, or without a text part, pass unchanged.

Run it:  pymilterkit run examples.footer:Footer --socket unix:/tmp/footer.sock
or:      python examples/footer.py [SOCKET]
"""

from __future__ import annotations

import email.policy
import html
import re
import sys
from collections.abc import Iterator
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.parser import BytesParser
from io import BytesIO
from typing import ClassVar

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, Milter, MilterSession, ProtocolOpts, Status

FOOTER = (
    "--\n"
    "This message was sent by Example Corp. If you are not the intended recipient,\n"
    "please tell the sender and delete it.\n"
)

#: Parse and write with CRLF, as the body travels between MTA and milter.
POLICY = email.policy.default.clone(linesep="\r\n")

#: Content-* headers that set_content() rewrites; every other one is restored afterwards.
REWRITTEN = frozenset({"content-type", "content-transfer-encoding"})


def text_parts(message: EmailMessage) -> Iterator[EmailMessage]:
    """The text/plain and text/html parts that are part of the message itself."""
    if message.get_content_maintype() == "message":
        return  # an attached message (message/rfc822...) is not ours to change
    if message.is_multipart():
        if message.get_content_subtype() in ("signed", "encrypted"):
            return
        for part in message.iter_parts():
            assert isinstance(part, EmailMessage)
            yield from text_parts(part)
        return
    if message.get_content_maintype() != "text":
        return
    if message.get_content_subtype() not in ("plain", "html"):
        return
    if message.get_content_disposition() == "attachment":
        return
    yield message


def with_footer(text: str, subtype: str, footer: str) -> str:
    """`text` with `footer` appended (as a paragraph before `</body>` for HTML)."""
    if subtype == "html":
        block = "<p>" + html.escape(footer).replace("\n", "<br>\n") + "</p>\n"
        close = list(re.finditer(r"(?i)</body\s*>", text))
        if close:
            at = close[-1].start()
            return text[:at] + block + text[at:]
        return text + ("" if text.endswith("\n") or not text else "\n") + block
    separator = "" if text.endswith("\n") or not text else "\n"
    return text + separator + "\n" + footer


def add_footer(part: EmailMessage, footer: str, *, is_root: bool) -> None:
    """Append the footer to one text part, re-encoding it with the same transfer encoding."""
    subtype = part.get_content_subtype()
    text = part.get_content()
    assert isinstance(text, str)
    new_text = with_footer(text, subtype, footer)

    charset = part.get_content_charset() or "us-ascii"
    try:
        new_text.encode(charset)
    except (LookupError, UnicodeEncodeError):
        charset = "utf-8"
    cte = part.get("Content-Transfer-Encoding", "7bit").strip().lower()
    new_cte: str | None = None  # email chooses: 7bit, 8bit, or qp/base64 for long lines
    if cte in ("base64", "quoted-printable"):
        new_cte = cte  # keep the part's encoding
    elif cte == "7bit" and not new_text.isascii():
        new_cte = "quoted-printable"  # 7-bit safe, and still readable
    params = {
        key: value
        for key, value in part["Content-Type"].params.items()
        if key.lower() not in ("charset",)
    } if part["Content-Type"] is not None else {}

    saved = [(n, v) for n, v in part.items() if n.lower().startswith("content-")
             and n.lower() not in REWRITTEN]
    had_mime_version = "MIME-Version" in part
    part.set_content(new_text, subtype=subtype, charset=charset, cte=new_cte, params=params)
    for name, value in saved:
        part[name] = value
    if not is_root and not had_mime_version:
        del part["MIME-Version"]  # EmailMessage.set_content adds it to every part


def top_level_mime(message: EmailMessage) -> dict[str, object]:
    """The top-level Content-Type and Content-Transfer-Encoding, compared by meaning."""
    content_type = message["Content-Type"]
    return {
        "Content-Type": None if content_type is None else (
            content_type.content_type,
            sorted((k.lower(), v) for k, v in content_type.params.items()),
        ),
        "Content-Transfer-Encoding": message.get("Content-Transfer-Encoding", "7bit")
        .strip().lower(),
    }


def serialize_body(message: EmailMessage) -> bytes:
    """The body of `message` (everything after the header block) as CRLF bytes."""
    out = BytesIO()
    BytesGenerator(out, policy=POLICY, mangle_from_=False).flatten(message)
    _, sep, body = out.getvalue().partition(b"\r\n\r\n")
    return body if sep else b""


class Footer(MilterSession):
    """Appends `footer` to every text part of a message, MIME-aware."""

    actions = Actions.CHANGE_BODY | Actions.CHANGE_HEADER | Actions.ADD_HEADER
    protocol = ProtocolOpts.SKIP
    footer: ClassVar[str] = FOOTER
    max_size: ClassVar[int] = 10 * 1024 * 1024

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.headers: list[tuple[str, str]] = []  # message-scoped: reset at each MAIL FROM
        self.body = bytearray()
        self.too_big = False
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers.append((name, value))
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        if self.too_big or len(self.body) + len(chunk) > self.max_size:
            self.too_big = True
            self.body.clear()
            return Status.SKIP  # no need for the rest of the body
        self.body += chunk
        return Status.CONTINUE

    def original(self) -> bytes:
        """The message as the MTA has it: headers (CRLF, one space after the colon) and body."""
        lines = []
        for name, value in self.headers:
            value = value.replace("\r\n", "\n").replace("\n", "\r\n")
            lines.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
        return b"".join(lines) + b"\r\n" + bytes(self.body)

    @override
    def on_eom(self) -> Status:
        if self.too_big:
            return Status.CONTINUE
        message = BytesParser(policy=POLICY).parsebytes(self.original())
        assert isinstance(message, EmailMessage)
        parts = list(text_parts(message))
        if not parts:
            return Status.CONTINUE
        before = top_level_mime(message)
        had_mime_version = "MIME-Version" in message
        for part in parts:
            add_footer(part, self.footer, is_root=part is message)

        after = top_level_mime(message)
        for name in ("Content-Type", "Content-Transfer-Encoding"):
            if after[name] != before[name]:
                self.change_header(name, str(message[name]))
        if not had_mime_version and "MIME-Version" in message:
            self.add_header("MIME-Version", "1.0")
        self.replace_body(serialize_body(message))
        return Status.CONTINUE


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    Milter(Footer, socket, name="Footer").run()
