"""Whole-message filters (`on_message`) behind a real Postfix.

A corpus (plain text, multipart/alternative, nested multipart with attachments, 8-bit and encoded
headers, folded headers, duplicate names, 20 MB, no body, no headers) goes through Postfix to a
filter that edits headers and bodies; what Postfix delivers must equal `message.email` as the
filter left it (header fields unfolded, body byte for byte) and the harness's `delivered` for the
message the filter got. Then `examples/attachments.py` behind Postfix.
"""

from __future__ import annotations

import email.header
import re
from email.message import EmailMessage
from pathlib import Path

import pytest

from pymilterkit.testing import Harness

from .content_filters import CRLF, CorpusEditor
from .mta import SENDER, Start


def _base(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice <{SENDER}>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    msg["X-Spam-Flag"] = "YES"
    return msg


def corpus() -> dict[str, bytes]:
    plain = _base("plain")
    plain.set_content("Hello Bob,\nplain text.\n")
    alternative = _base("alternative")
    alternative.set_content("text part\n")
    alternative.add_alternative("<html><body><p>html part</p></body></html>\n", subtype="html")
    nested = _base("nested")
    nested.set_content("see attached\n", cte="quoted-printable")
    nested.add_alternative("<p>see attached</p>\n", subtype="html", cte="base64")
    nested.add_attachment(b"%PDF-1.4" * 100, maintype="application", subtype="pdf",
                          filename="report.pdf")
    nested.add_attachment(b"MZ\x90\x00" * 50, maintype="application", subtype="octet-stream",
                          filename="setup.exe")
    inner = _base("inner")
    inner.set_content("inner text\n")
    nested.add_attachment(inner)
    eight_bit = (
        b"From: J\xc3\xb6rg <joerg@example.net>\r\nTo: bob@example.com\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=\r\nX-Raw: caf\xc3\xa9 cr\xc3\xa8me\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    )
    folded = (
        b"From: a@example.net\r\nTo: bob@example.com\r\n"
        b"Subject: a subject that goes on\r\n and on over\r\n\tthree lines\r\n"
        b"X-Folded: one\r\n  two\r\n\tthree\r\n\r\nbody\r\n"
    )
    duplicates = (
        b"From: a@example.net\r\nX-Dup: 1\r\nTo: bob@example.com\r\nX-Dup: 2\r\nX-Dup:3\r\n"
        b"Received: from x by y\r\nX-Spam-Flag: YES\r\nX-Dup:  4\r\nReceived: from z\r\n"
        b"X-Spam-Flag: NO\r\n\r\nduplicates\r\n"
    )
    big = b"From: a@example.net\r\nSubject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 260_000
    return {
        "plain": plain.as_bytes(policy=CRLF), "alternative": alternative.as_bytes(policy=CRLF),
        "nested": nested.as_bytes(policy=CRLF), "eightbit": eight_bit, "folded": folded,
        "duplicates": duplicates, "big": big,
        "nobody": b"From: a@example.net\r\nSubject: no body\r\n",
        "noheaders": b"just a body, no header at all\r\nsecond line\r\n",
    }


def _split(raw: bytes) -> tuple[list[bytes], bytes]:
    """Header fields unfolded, and the body; LF line ends."""
    raw = raw.replace(b"\r\n", b"\n")
    head, _, body = raw.partition(b"\n\n")
    head = head.removesuffix(b"\n")  # a message without an empty line and a body
    fields = re.sub(rb"\n(?=[ \t])", b"", head).split(b"\n")
    return [re.sub(rb"^([^:]+):[ \t]*", rb"\1: ", f) for f in fields], body


def _raw_8bit(field: bytes) -> bytes:
    """`field` with its `=?unknown-8bit?...?=` words as the bytes they stand for: from Python
    3.13 the standard library writes an untouched 8-bit value that way (before, as it was)."""
    if b"=?unknown-8bit?" not in field:
        return field
    name, _, value = field.partition(b": ")
    parts = email.header.decode_header(value.decode("ascii"))
    return name + b": " + b"".join(p if isinstance(p, bytes) else p.encode() for p, _ in parts)


def test_a_corpus_through_postfix(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dumps, again = tmp_path / "dumps", tmp_path / "again"
    dumps.mkdir()
    again.mkdir()
    dumps.chmod(0o777)
    messages = corpus()
    assert len(messages["big"]) > 20_000_000
    setup = start("tests.e2e.content_filters:CorpusEditor", env={"PMK_CORPUS_DIR": str(dumps)},
                  extra_config={"message_size_limit": "60000000",
                                "milter_content_timeout": "120s"})
    for name, raw in messages.items():
        assert setup.send(raw, [f"{name}@example.com"]) == {}
    delivered = {d.recipients[0].split("@")[0]: d
                 for d in setup.postfix.wait_for_delivery(len(messages), timeout=120)}
    monkeypatch.setenv("PMK_CORPUS_DIR", str(again))
    for name in messages:
        # Postfix puts its own Received field on top and shows milters the message without it
        own, got = delivered[name].raw.split(b"\n", 1)
        while got[:1] in (b" ", b"\t"):
            own, got = own + got.split(b"\n", 1)[0], got.split(b"\n", 1)[1]
        assert own.startswith(b"Received: from client.example.net"), name
        seen = (dumps / f"{name}.orig").read_bytes()
        edited = (dumps / f"{name}.edited").read_bytes()
        fields, body = _split(got)
        want_fields, want_body = _split(edited)
        want_fields = [_raw_8bit(f) for f in want_fields]
        assert body == want_body, name
        assert fields == want_fields, name
        result = Harness(CorpusEditor, reraise=True).run(seen, recipients=[f"{name}@example.com"])
        assert _split(result.delivered) == (fields, body), name
        if name != "nobody":  # the milter is not told whether an empty line ends the headers
            assert result.delivered.replace(b"\r\n", b"\n") == got, name
    assert b"X-Spam-Flag" not in delivered["duplicates"].raw
    assert re.findall(rb"X-Dup: ?(\d)", delivered["duplicates"].raw) == [b"1", b"3"]
    assert b"setup.exe" not in delivered["nested"].raw
    assert b"\n-- \nchecked\n" in delivered["plain"].raw
    plain_names = [f.split(b":", 1)[0] for f in _split(delivered["plain"].raw)[0]]
    assert plain_names[1:4] == [b"From", b"X-Second", b"To"]  # under Postfix's Received:


def test_attachments_example_through_postfix(start: Start) -> None:
    from tests.examples.test_attachments import with_files

    setup = start("examples.attachments:Attachments")
    assert setup.send(with_files(), ["bob@example.com"]) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    message = delivered.message
    assert message["X-Removed-Attachments"] == "Invoice.PDF.exe, setup.bin, run.js"
    names = [p.get_filename() for p in message.walk() if p.get_filename()]
    assert names == ["report.pdf", "notes.txt"]
