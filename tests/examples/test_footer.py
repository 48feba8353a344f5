"""examples/footer.py: a MIME-aware footer, checked on the message as it would be delivered."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from examples.footer import FOOTER, Footer
from pymilterkit import Status
from pymilterkit.testing import MessageResult
from pymilterkit.testing.pytest_plugin import HarnessFactory, ProcessFactory

CRLF = email.policy.default.clone(linesep="\r\n")
ATTACHMENT = bytes(range(256)) * 4


def base(subject: str = "test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.net>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    return msg


def raw(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=CRLF)


def delivered(original: bytes, result: MessageResult) -> EmailMessage:
    assert result.status is Status.CONTINUE
    assert result.original == original
    out = BytesParser(policy=email.policy.default).parsebytes(result.delivered)
    assert isinstance(out, EmailMessage)
    return out


def text(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def html_footer() -> str:
    return "<p>" + FOOTER.replace("\n", "<br>\n") + "</p>\n"


def structure(msg: EmailMessage) -> list[str]:
    return [part.get_content_type() for part in msg.walk()]


def test_plain_7bit_single_part(milter_harness: HarnessFactory) -> None:
    original = b"From: a@example.net\r\nSubject: hi\r\n\r\nHello Bob,\r\nsee you.\r\n"
    result = milter_harness(Footer).run(original)
    # Only the body changes, plus the headers that make it a proper MIME message.
    assert result.headers_changed == () and result.headers_deleted == ()
    assert [(h.name, h.value) for h in result.headers_added] == [
        ("Content-Type", ' text/plain; charset="us-ascii"'),
        ("Content-Transfer-Encoding", " 7bit"), ("MIME-Version", " 1.0")]
    assert result.new_body == b"Hello Bob,\r\nsee you.\r\n\r\n" + FOOTER.replace(
        "\n", "\r\n").encode()
    out = delivered(original, result)
    assert text(out) == "Hello Bob,\nsee you.\n\n" + FOOTER


def test_last_line_without_newline(milter_harness: HarnessFactory) -> None:
    original = b"Subject: hi\r\nMIME-Version: 1.0\r\n\r\nno newline"
    out = delivered(original, milter_harness(Footer).run(original))
    assert text(out) == "no newline\n\n" + FOOTER


@pytest.mark.parametrize("cte", ["quoted-printable", "base64"])
def test_encoded_single_part_keeps_its_encoding(milter_harness: HarnessFactory,
                                                cte: str) -> None:
    msg = base()
    msg.set_content("Grüße aus Köln \u2013 " + "lange Zeile " * 10 + "\n", charset="utf-8", cte=cte)
    original = raw(msg)
    out = delivered(original, milter_harness(Footer).run(original))
    assert out["Content-Transfer-Encoding"] == cte
    assert text(out) == "Grüße aus Köln \u2013 " + "lange Zeile " * 10 + "\n\n" + FOOTER
    assert out.get_content_charset() == "utf-8"


def test_ascii_part_gets_a_non_ascii_footer_as_quoted_printable(
    milter_harness: HarnessFactory,
) -> None:
    class Umlaut(Footer):
        footer = "Grüße, Ihr Team\n"

    msg = base()
    msg.set_content("plain ascii\n", charset="us-ascii")
    original = raw(msg)
    result = milter_harness(Umlaut).run(original)
    out = delivered(original, result)
    assert out["Content-Transfer-Encoding"] == "quoted-printable"
    assert text(out) == "plain ascii\n\nGrüße, Ihr Team\n"
    assert out.get_content_charset() == "utf-8"
    assert result.delivered.isascii()


def test_eight_bit_latin1_part_keeps_its_charset(milter_harness: HarnessFactory) -> None:
    original = (
        b"Subject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1; format=flowed\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xfc\xdfe\r\n"
    )
    result = milter_harness(Footer).run(original)
    assert result.headers_changed == ()  # same type, same parameters, same encoding
    out = delivered(original, result)
    assert out.get_content_charset() == "iso-8859-1"
    assert out["Content-Type"].params["format"] == "flowed"
    assert text(out) == "Grüße\n\n" + FOOTER


def multipart() -> EmailMessage:
    msg = base("report")
    msg.set_content("Hallo Bob, der Bericht \u2013 anbei.\n", cte="quoted-printable")
    msg.add_alternative("<html><body><p>Hallo Bob, der Bericht \u2013 anbei.</p></body></html>\n",
                        subtype="html", cte="base64")
    msg.add_attachment(ATTACHMENT, maintype="application", subtype="pdf",
                       filename="report.pdf")
    msg.add_attachment("an attached text file\n", filename="notes.txt")
    inner = base("forwarded")
    inner.set_content("inner message text\n")
    msg.add_attachment(inner)
    msg.preamble = "This is a multi-part message in MIME format.\n"
    return msg


def test_multipart_every_text_part_gets_the_footer_once(milter_harness: HarnessFactory) -> None:
    original = raw(multipart())
    result = milter_harness(Footer).run(original)
    # Top-level headers are untouched: the boundary and the structure stay the same.
    assert result.headers_changed == () and result.headers_added == ()
    out = delivered(original, result)
    before = BytesParser(policy=email.policy.default).parsebytes(original)
    assert isinstance(before, EmailMessage)
    assert structure(out) == structure(before) == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html",
        "application/pdf", "text/plain", "message/rfc822", "text/plain",
    ]
    assert out.get_boundary() == before.get_boundary()
    assert out.preamble == before.preamble

    parts = list(out.walk())
    plain, html_part = parts[2], parts[3]
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert html_part["Content-Transfer-Encoding"] == "base64"
    assert text(plain) == "Hallo Bob, der Bericht \u2013 anbei.\n\n" + FOOTER
    assert text(html_part) == (
        "<html><body><p>Hallo Bob, der Bericht \u2013 anbei.</p>"
        + html_footer()
        + "</body></html>\n"
    )
    for part in (plain, html_part):
        assert text(part).count("please tell the sender and delete it.") == 1

    # Attachments, including a text file and an attached message, are untouched.
    assert parts[4].get_content() == ATTACHMENT
    assert parts[4].get_filename() == "report.pdf"
    assert text(parts[5]) == "an attached text file\n"
    assert parts[5].get_content_disposition() == "attachment"
    assert text(parts[7]) == "inner message text\n"
    assert "MIME-Version" not in plain  # no stray headers on subparts


def test_content_headers_of_a_part_are_kept(milter_harness: HarnessFactory) -> None:
    original = (
        b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XYZ\r\n\r\n"
        b"--XYZ\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Language: en\r\n"
        b"Content-Disposition: inline\r\nContent-ID: <part1@example.net>\r\n\r\nhello\r\n"
        b"--XYZ--\r\n"
    )
    out = delivered(original, milter_harness(Footer).run(original))
    [part] = out.iter_parts()
    assert isinstance(part, EmailMessage)
    assert part["Content-Language"] == "en"
    assert part["Content-ID"] == "<part1@example.net>"
    assert part.get_content_disposition() == "inline"
    assert text(part) == "hello\n\n" + FOOTER


def test_html_without_body_tag(milter_harness: HarnessFactory) -> None:
    msg = base()
    msg.set_content("<b>hi</b>", subtype="html")
    original = raw(msg)
    out = delivered(original, milter_harness(Footer).run(original))
    assert text(out) == "<b>hi</b>\n" + html_footer()


@pytest.mark.parametrize("kind", ["signed", "image", "too-big"])
def test_messages_left_alone(milter_harness: HarnessFactory, kind: str) -> None:
    class Small(Footer):
        max_message_size = 100

    cls: type[Footer] = Footer
    msg = base()
    if kind == "signed":
        msg.set_content("signed text\n")
        msg.add_attachment(b"sig", maintype="application", subtype="pgp-signature")
        msg.replace_header("Content-Type", 'multipart/signed; protocol="application/'
                                           f'pgp-signature"; boundary="{msg.get_boundary()}"')
    elif kind == "image":
        msg.set_content(b"\x89PNG", maintype="image", subtype="png")
    else:
        msg.set_content("x" * 70 + "\n" + "y" * 70 + "\n")
        cls = Small
    result = milter_harness(cls).run(raw(msg))
    assert result.status is Status.CONTINUE
    assert result.modifications == ()


def test_per_message_state(milter_harness: HarnessFactory) -> None:
    first = b"Subject: 1\r\nMIME-Version: 1.0\r\n\r\none\r\n"
    second = b"Subject: 2\r\nMIME-Version: 1.0\r\n\r\ntwo\r\n"
    conn = milter_harness(Footer).run_connection([first, second])
    assert [text(delivered(m, r)) for m, r in zip((first, second), conn.messages, strict=True)
            ] == ["one\n\n" + FOOTER, "two\n\n" + FOOTER]


def test_behind_the_real_libmilter(milter_process: ProcessFactory) -> None:
    original = raw(multipart())
    client = milter_process(Footer)
    result = client.run(original, recipients=["bob@example.com"])
    out = delivered(original, result)
    assert text(list(out.walk())[2]).endswith("\n\n" + FOOTER)
