"""pymilterkit filters behind a real Postfix: what a client sees and what gets delivered.

Each test starts a filter with `pymilterkit run` (`MilterProcess`) on a unix socket that
Postfix's smtpd can reach (or on 127.0.0.1 TCP), a private Postfix (`postfix_factory`) whose
`smtpd_milters` points at it, sends mail with `smtplib`, and checks the sink (what Postfix
delivered), the hold queue, or the SMTP error the client got. On failure the Postfix log and
the milter's log are printed (pytest shows them under "Captured stdout teardown").
"""

from __future__ import annotations

import email.policy
import os
import smtplib
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from examples.footer import FOOTER
from pymilterkit.testing import MilterProcess

from .filters import RCPT_REJECT_LINES, REJECT_LINES
from .postfix import PostfixFactory, PostfixInstance, free_port

ROOT = Path(__file__).resolve().parents[2]
CRLF = email.policy.default.clone(linesep="\r\n")
SENDER = "alice@example.net"


def message(subject: str = "hello", body: str = "Hello Bob.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice <{SENDER}>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes(policy=CRLF)


@dataclass
class Setup:
    """A filter process and the Postfix instance that uses it."""

    milter: MilterProcess
    postfix: PostfixInstance

    def send(
        self,
        msg: bytes,
        recipients: list[str],
        sender: str = SENDER,
        helo: str = "client.example.net",
    ) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=30) as smtp:
            smtp.ehlo(helo)
            return smtp.sendmail(sender, recipients, msg)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=30)


Start = Callable[..., Setup]


@pytest.fixture
def start(
    postfix_factory: PostfixFactory, milter_socket_dir: Path
) -> Iterator[Start]:
    """`start("module:Class", inet=False, extra_config=None)`: a filter and a Postfix using it."""
    setups: list[Setup] = []
    processes: list[MilterProcess] = []

    def make(
        target: str,
        *,
        inet: bool = False,
        extra_config: dict[str, str] | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Setup:
        if inet:
            port = free_port()
            milter_spec, postfix_spec = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
        else:
            path = milter_socket_dir / f"m{len(processes)}.sock"
            milter_spec, postfix_spec = f"unix:{path}", f"unix:{path}"
        socket_args = [] if inet else ["--socket-mode", "666"]  # smtpd runs as user postfix
        process = MilterProcess(
            target, milter_spec, args=[*socket_args, *args], cwd=ROOT,
            env=None if env is None else {**os.environ, **env},
        )
        processes.append(process)
        process.start()
        setup = Setup(process, postfix_factory(postfix_spec, extra_config))
        setups.append(setup)
        return setup

    yield make
    for process in processes:
        process.stop()
    # Shown by pytest only when the test failed.
    for setup in setups:
        print(f"--- milter log ({setup.milter.target}) ---\n{setup.milter.log()}")
        print(f"--- postfix maillog ---\n{setup.postfix.log_text()}")
    for process in processes:
        process.__exit__(None, None, None)


def test_recipient_counter_adds_its_header(start: Start) -> None:
    setup = start("examples.rcpt_count:RcptCount")
    recipients = ["bob@example.com", "carol@example.org", "dave@example.com"]
    assert setup.send(message(), recipients) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.message.get_all("X-Rcpt-Count") == ["3"]
    assert b"\nX-Rcpt-Count: 3\n" in delivered.raw
    assert sorted(delivered.recipients) == sorted(recipients)


def test_recipient_counter_over_tcp(start: Start) -> None:
    setup = start("examples.rcpt_count:RcptCount", inet=True)
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.message["X-Rcpt-Count"] == "1"


def test_routing_adds_and_removes_recipients_and_changes_the_sender(start: Start) -> None:
    setup = start("examples.mixins:AuditedRouting")
    recipients = ["sales@example.com", "noreply@example.org", "bob@example.com"]
    assert setup.send(message("order"), recipients, sender="carol@legacy.example.net") == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert sorted(delivered.recipients) == [
        "archive@example.com", "bob@example.com", "sales@example.com"
    ]
    assert delivered.sender == "carol@example.com"
    # The mixin's header carries Postfix's real queue id, and the smtpd's name (macro j).
    assert delivered.message["X-Audit"] == (
        f"AuditedRouting on mta.pymilterkit.test queue-id={delivered.queue_id}; "
        "client=localhost [127.0.0.1]"
    )
    assert delivered.message["Subject"] == "order"


def test_tagger_tags_and_prefixes_the_subject(start: Start) -> None:
    setup = start("examples.tagger:Tagger")
    msg = message("urgent: invoice").replace(b"Subject:", b"X-Tag: spoofed\r\nSubject:", 1)
    assert setup.send(msg, ["bob@example.com"]) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.message.get_all("X-Tag") == ["finance, urgent"]
    assert delivered.message.get_all("Subject") == ["[URGENT] urgent: invoice"]


def test_footer_replaces_the_body(start: Start) -> None:
    setup = start("examples.footer:Footer")
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = "bob@example.com"
    msg["Subject"] = "report"
    msg.set_content("Grüße, Bob.\n", cte="quoted-printable")
    msg.add_alternative("<html><body><p>Grüße</p></body></html>\n", subtype="html", cte="base64")
    msg.add_attachment(b"%PDF-1.4 binary\x00\xff", maintype="application", subtype="pdf",
                       filename="r.pdf")
    assert setup.send(msg.as_bytes(policy=CRLF), ["bob@example.com"]) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    out = delivered.message
    parts = [p for p in out.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html", "application/pdf"]
    plain, html, pdf = parts
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert html["Content-Transfer-Encoding"] == "base64"
    assert plain.get_content() == "Grüße, Bob.\n\n" + FOOTER
    assert str(html.get_content()).count("please tell the sender and delete it.") == 1
    assert pdf.get_content() == b"%PDF-1.4 binary\x00\xff"
    assert out.get_boundary() == msg.get_boundary()


def test_footer_changes_headers_of_a_single_part_message(start: Start) -> None:
    setup = start("examples.footer:Footer")
    raw = b"From: a@example.net\r\nTo: bob@example.com\r\nSubject: plain\r\n\r\nJust text.\r\n"
    assert setup.send(raw, ["bob@example.com"]) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.message["MIME-Version"] == "1.0"
    assert delivered.message["Content-Type"] == 'text/plain; charset="us-ascii"'
    assert delivered.raw.endswith(b"\n\nJust text.\n\n" + FOOTER.encode())


def test_rejection_with_a_multi_line_reply(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        setup.send(message("please reject me"), ["bob@example.com"])
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"\n".join(
        b"5.7.1 " + line.encode() for line in REJECT_LINES)
    assert setup.postfix.delivered() == []


def test_recipient_rejection_with_a_multi_line_reply(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    refused = setup.send(message(), ["blocked@example.com", "bob@example.com"])
    assert refused == {
        "blocked@example.com": (
            550, b"\n".join(b"5.7.1 " + line.encode() for line in RCPT_REJECT_LINES)),
    }
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.recipients == ("bob@example.com",)
    assert delivered.message["X-Seen"] == "yes"


def test_tempfail_when_the_filter_raises_and_the_next_message_goes_through(
    start: Start,
) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    with setup.smtp() as smtp:
        smtp.ehlo("client.example.net")
        with pytest.raises(smtplib.SMTPDataError) as failed:
            smtp.sendmail(SENDER, ["bob@example.com"], message("boom"))
        assert failed.value.smtp_code == 451
        assert failed.value.smtp_error == b"4.7.1 Service unavailable - try again later"
        smtp.rset()
        # Same SMTP connection, same milter connection: the filter goes on.
        assert smtp.sendmail(SENDER, ["bob@example.com"], message("after the failure")) == {}
    assert setup.send(message("new connection"), ["bob@example.com"]) == {}
    delivered = setup.postfix.wait_for_delivery(2)
    # (Postfix may deliver the two in either order.)
    assert sorted(d.message["Subject"] for d in delivered) == [
        "after the failure", "new connection"]
    assert all(d.message["X-Seen"] == "yes" for d in delivered)
    assert "the test filter blew up on purpose" in setup.milter.log()


def test_quarantine_puts_the_message_on_hold(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    assert setup.send(message("hold this"), ["bob@example.com"]) == {}
    [queue_id] = setup.postfix.wait_for_held(1)
    # Postfix logs the hold: 3.10 with the milter's reason, 3.7 with a fixed text.
    logged = f"{queue_id}: milter-hold: END-OF-MESSAGE from localhost[127.0.0.1]: "
    assert any(
        logged + reason in setup.postfix.log_text()
        for reason in ("held by the e2e test filter", "milter triggers HOLD action")
    ), setup.postfix.log_text()
    assert "Subject: hold this" in setup.postfix.postcat(queue_id)
    assert setup.postfix.delivered() == []


POLICY_CONTACT = b"5.7.1 Contact postmaster@example.com if this is a mistake."


def test_policy_rejects_a_bad_helo_with_a_multi_line_reply(start: Start) -> None:
    # Postfix answers EHLO itself and gives the milter's HELO rejection at MAIL FROM, for
    # the rest of the connection (libmilter: a rejection at HELO is for the connection).
    setup = start("examples.policy:ConnectionPolicy")
    expected = (
        b"5.7.1 HELO localhost rejected: it is not your host name.\n"
        b"5.7.1 Use the fully qualified name of your mail server.\n" + POLICY_CONTACT
    )
    with setup.smtp() as smtp:
        code, _ = smtp.ehlo("localhost")
        assert code == 250
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(SENDER, ["bob@example.com"], message())
        assert (refused.value.smtp_code, refused.value.smtp_error) == (550, expected)
        code, _ = smtp.ehlo("client.example.net")  # too late for this connection
        assert smtp.mail(SENDER) == (550, expected)
    # A new connection with a proper name gets through.
    assert setup.send(message(), ["bob@example.com"], helo="client.example.net") == {}
    setup.postfix.wait_for_delivery(1)


def smtp_dialogue(port: int, commands: list[bytes]) -> list[tuple[int, bytes]]:
    """Each reply (code, lines joined with LF, codes stripped) to greeting + commands.

    smtplib gives up on a greeting that is not 220, so a refused connection is read raw.
    """
    replies: list[tuple[int, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        reader = conn.makefile("rb")
        for command in [b"", *commands]:
            if command:
                conn.sendall(command + b"\r\n")
            lines = []
            while True:
                line = reader.readline()
                assert line, f"connection closed, replies so far: {replies}"
                lines.append(line[4:].rstrip(b"\r\n"))
                if line[3:4] != b"-":
                    break
            replies.append((int(line[:3]), b"\n".join(lines)))
    return replies


def test_policy_rejects_at_connect_with_a_multi_line_reply(start: Start) -> None:
    # Postfix greets with its own 554 and gives the milter's reply at MAIL FROM.
    setup = start("tests.e2e.filters:LoopbackBlocked")
    expected = (
        b"5.7.1 Connections from 127.0.0.1 are not accepted here.\n"
        b"5.7.1 This network is blocked by local policy.\n" + POLICY_CONTACT
    )
    greeting, ehlo, mail, quit_ = smtp_dialogue(setup.postfix.smtp_port, [
        b"EHLO client.example.net", b"MAIL FROM:<alice@example.net>", b"QUIT"])
    assert greeting == (554, b"mta.pymilterkit.test ESMTP not accepting connections")
    assert ehlo[0] == 250
    assert mail == (550, expected)
    assert quit_[0] == 221
    with pytest.raises(smtplib.SMTPConnectError):
        setup.smtp()
    assert setup.postfix.delivered() == []


def test_a_message_without_header_lines_over_tcp_is_filtered(start: Start) -> None:
    # Postfix adds no headers for a client outside local_header_rewrite_clients, so the milter
    # sees DATA (answered on TCP) and then the body with no header in between; libmilter used to
    # leave that body unanswered (Postfix: "can't read SMFIC_BODY reply packet header").
    setup = start("tests.integration.filters:HeadersBodyAndRcpt", inet=True,
                  extra_config={"local_header_rewrite_clients": "",
                                "milter_content_timeout": "10s"})
    assert setup.send(b"just a body\r\n", ["bob@example.com"]) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.message["X-Shape"] == "0 13"
