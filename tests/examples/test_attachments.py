"""examples/attachments.py: executables removed by extension and by type, listed in a header."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage
from email.parser import BytesParser

from examples.attachments import Attachments
from pymilterkit import Status
from pymilterkit.testing import MessageResult
from pymilterkit.testing.pytest_plugin import HarnessFactory, ProcessFactory

CRLF = email.policy.default.clone(linesep="\r\n")


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.net>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = "files"
    msg.set_content("see the files\n")
    return msg


def with_files() -> bytes:
    msg = message()
    msg.add_attachment(b"MZ\x90\x00", maintype="application", subtype="octet-stream",
                       filename="Invoice.PDF.exe")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf",
                       filename="report.pdf")
    msg.add_attachment(b"MZ", maintype="application", subtype="x-msdownload",
                       filename="setup.bin")
    inner = EmailMessage()
    inner.set_content("nested text\n")
    inner.add_attachment(b"alert(1)", maintype="text", subtype="javascript", filename="run.js")
    inner.add_attachment(b"ok", maintype="text", subtype="plain", filename="notes.txt")
    msg.attach(inner)
    return msg.as_bytes(policy=CRLF)


def parsed(result: MessageResult) -> EmailMessage:
    assert result.status is Status.CONTINUE
    out = BytesParser(policy=email.policy.default).parsebytes(result.delivered)
    assert isinstance(out, EmailMessage)
    return out


def filenames(msg: EmailMessage) -> list[str]:
    return [part.get_filename() or "" for part in msg.walk() if part.get_filename()]


def test_executables_are_removed_at_any_depth(milter_harness: HarnessFactory) -> None:
    result = milter_harness(Attachments).run(with_files())
    out = parsed(result)
    assert out["X-Removed-Attachments"] == "Invoice.PDF.exe, setup.bin, run.js"
    assert filenames(out) == ["report.pdf", "notes.txt"]
    assert [p.get_content_type() for p in out.walk()] == [
        "multipart/mixed", "text/plain", "application/pdf", "multipart/mixed", "text/plain",
        "text/plain"]
    assert result.new_body is not None and result.headers_changed == ()


def test_clean_messages_and_signed_ones_pass_untouched(milter_harness: HarnessFactory) -> None:
    clean = message()
    clean.add_attachment(b"%PDF", maintype="application", subtype="pdf", filename="a.pdf")
    signed = message()
    signed.add_attachment(b"MZ", maintype="application", subtype="octet-stream",
                          filename="tool.exe")
    signed.replace_header("Content-Type", "multipart/signed; protocol=\"application/"
                          f"pgp-signature\"; boundary=\"{signed.get_boundary()}\"")
    for msg in (clean, signed):
        result = milter_harness(Attachments).run(msg.as_bytes(policy=CRLF))
        assert result.modifications == () and result.diff() == ""


def test_a_forged_header_is_removed(milter_harness: HarnessFactory) -> None:
    forged = b"X-Removed-Attachments: nothing, trust me\r\n" + message().as_bytes(policy=CRLF)
    result = milter_harness(Attachments).run(forged)
    assert "X-Removed-Attachments" not in parsed(result)
    assert result.new_body is None and len(result.headers_deleted) == 1


def test_behind_the_real_libmilter(milter_process: ProcessFactory) -> None:
    client = milter_process(Attachments)
    result = client.run(with_files(), recipients=["bob@example.com"])
    assert filenames(parsed(result)) == ["report.pdf", "notes.txt"]
