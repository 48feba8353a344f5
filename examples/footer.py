"""A MIME-aware footer (disclaimer): appends a footer to every text part of a message.

`on_message` gets the whole message, parsed by the standard `email` package (`message.email`),
and edits it in place; pymilterkit turns the edits into milter actions (`replace_body`, and the
header changes a re-encoded single-part message needs):

* every `text/plain` part gets `FOOTER` appended, every `text/html` part gets it as a
  paragraph before `</body>` (or at the end), in single-part and multipart messages alike;
* attachments (`Content-Disposition: attachment`), attached messages (`message/rfc822`) and
  signed or encrypted messages (`multipart/signed`, `multipart/encrypted`) are left alone;
* each part is re-encoded through `email`'s API: a base64 or quoted-printable part stays
  base64 or quoted-printable, its charset is kept when it can hold the footer (else UTF-8),
  and its other `Content-*` headers (disposition, id, language...) are kept.

Messages larger than `max_message_size` bytes, or without a text part, pass unchanged.

Run it:  pymilterkit run examples.footer:Footer --socket unix:/tmp/footer.sock
or:      python examples/footer.py [SOCKET]
"""

from __future__ import annotations

import html
import re
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from typing import ClassVar

from typing_extensions import override

from pymilterkit import Actions, Message, Milter, MilterSession, Status

FOOTER = (
    "--\n"
    "This message was sent by Example Corp. If you are not the intended recipient,\n"
    "please tell the sender and delete it.\n"
)

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


class Footer(MilterSession):
    """Appends `footer` to every text part of a message, MIME-aware."""

    actions = Actions.CHANGE_BODY | Actions.CHANGE_HEADER | Actions.ADD_HEADER
    footer: ClassVar[str] = FOOTER
    max_message_size = 10 * 1024 * 1024

    @override
    def on_message(self, message: Message) -> Status:
        mail = message.email
        for part in list(text_parts(mail)):
            add_footer(part, self.footer, is_root=part is mail)
        return Status.CONTINUE


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    Milter(Footer, socket, name="Footer").run()
