"""pymilterkit filters behind a real Postfix and a real Sendmail 8.17: what a client sees and
what gets delivered.

Each test starts a filter with `pymilterkit run` on a unix socket (or on 127.0.0.1 TCP) and a
private MTA whose only milter it is (the `start` fixture, see mta.py), sends mail with
`smtplib`, and checks what the MTA delivered to its sink, what it held, or the SMTP error the
client got. Most tests run behind both MTAs (`@on(POSTFIX, SENDMAIL)`), where they differ the
difference is in `Mta` or stated in the test; a few show one MTA's own behaviour. On failure the
MTA's log and the milter's log are printed (pytest shows them under "Captured stdout teardown").
"""

from __future__ import annotations

import smtplib
import socket
from email.message import EmailMessage

import pytest

from examples.footer import FOOTER

from .filters import RCPT_REJECT_LINES, REJECT_LINES
from .mta import CRLF, POSTFIX, SENDER, SENDMAIL, Start, message, on

BOTH = on(POSTFIX, SENDMAIL)


@BOTH
def test_recipient_counter_adds_its_header(start: Start) -> None:
    setup = start("examples.rcpt_count:RcptCount")
    recipients = ["bob@example.com", "carol@example.org", "dave@example.com"]
    assert setup.send(message(), recipients) == {}
    [delivered] = setup.server.wait_for_delivery(1)
    assert delivered.message.get_all("X-Rcpt-Count") == ["3"]
    assert b"\nX-Rcpt-Count: 3\n" in delivered.raw
    assert sorted(delivered.recipients) == sorted(recipients)


@BOTH
def test_recipient_counter_over_tcp(start: Start) -> None:
    setup = start("examples.rcpt_count:RcptCount", inet=True)
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.server.wait_for_delivery(1)
    assert delivered.message["X-Rcpt-Count"] == "1"


@BOTH
def test_routing_adds_and_removes_recipients_and_changes_the_sender(start: Start) -> None:
    setup = start("examples.mixins:AuditedRouting")
    recipients = ["sales@example.com", "noreply@example.org", "bob@example.com"]
    assert setup.send(message("order"), recipients, sender="carol@legacy.example.net") == {}
    [delivered] = setup.server.wait_for_delivery(1)
    assert sorted(delivered.recipients) == [
        "archive@example.com", "bob@example.com", "sales@example.com"
    ]
    assert delivered.sender == "carol@example.com"
    # The mixin's header carries the MTA's real queue id, and its name (macro j).
    audit = delivered.message["X-Audit"]
    assert audit.startswith(f"AuditedRouting on {setup.mta.hostname} queue-id=")
    assert "queue-id=unknown" not in audit
    if setup.mta.name == POSTFIX:  # the sink knows Postfix's queue id, and Postfix sends {client}
        assert audit == (
            f"AuditedRouting on {setup.mta.hostname} queue-id={delivered.queue_id}; "
            "client=localhost [127.0.0.1]"
        )
    assert delivered.message["Subject"] == "order"


@BOTH
def test_tagger_tags_and_prefixes_the_subject(start: Start) -> None:
    setup = start("examples.tagger:Tagger")
    msg = message("urgent: invoice").replace(b"Subject:", b"X-Tag: spoofed\r\nSubject:", 1)
    assert setup.send(msg, ["bob@example.com"]) == {}
    [delivered] = setup.server.wait_for_delivery(1)
    assert delivered.message.get_all("X-Tag") == ["finance, urgent"]
    assert delivered.message.get_all("Subject") == ["[URGENT] urgent: invoice"]


@BOTH
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
    [delivered] = setup.server.wait_for_delivery(1)
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


@BOTH
def test_footer_changes_headers_of_a_single_part_message(start: Start) -> None:
    setup = start("examples.footer:Footer")
    raw = b"From: a@example.net\r\nTo: bob@example.com\r\nSubject: plain\r\n\r\nJust text.\r\n"
    assert setup.send(raw, ["bob@example.com"]) == {}
    [delivered] = setup.server.wait_for_delivery(1)
    assert delivered.message["MIME-Version"] == "1.0"
    assert delivered.message["Content-Type"] == 'text/plain; charset="us-ascii"'
    assert delivered.raw.endswith(b"\n\nJust text.\n\n" + FOOTER.encode())


@BOTH
def test_rejection_with_a_multi_line_reply(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        setup.send(message("please reject me"), ["bob@example.com"])
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"\n".join(
        b"5.7.1 " + line.encode() for line in REJECT_LINES)
    assert setup.server.delivered() == []


@BOTH
def test_recipient_rejection_with_a_multi_line_reply(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    refused = setup.send(message(), ["blocked@example.com", "bob@example.com"])
    # Sendmail puts "<recipient>... " before the first line (Postfix sends the lines as given).
    lines = [setup.mta.rcpt_reply_prefix + RCPT_REJECT_LINES[0], *RCPT_REJECT_LINES[1:]]
    assert refused == {
        "blocked@example.com": (550, b"\n".join(b"5.7.1 " + line.encode() for line in lines)),
    }
    [delivered] = setup.server.wait_for_delivery(1)
    assert delivered.recipients == ("bob@example.com",)
    assert delivered.message["X-Seen"] == "yes"


@BOTH
def test_tempfail_when_the_filter_raises_and_the_next_message_goes_through(
    start: Start,
) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    with setup.smtp() as smtp:
        smtp.ehlo("client.example.net")
        with pytest.raises(smtplib.SMTPDataError) as failed:
            smtp.sendmail(SENDER, ["bob@example.com"], message("boom"))
        assert failed.value.smtp_code == 451
        assert failed.value.smtp_error == setup.mta.tempfail_reply
        smtp.rset()
        # Same SMTP connection, same milter connection: the filter goes on.
        assert smtp.sendmail(SENDER, ["bob@example.com"], message("after the failure")) == {}
    assert setup.send(message("new connection"), ["bob@example.com"]) == {}
    delivered = setup.server.wait_for_delivery(2)
    # (The MTA may deliver the two in either order.)
    assert sorted(d.message["Subject"] for d in delivered) == [
        "after the failure", "new connection"]
    assert all(d.message["X-Seen"] == "yes" for d in delivered)
    assert "the test filter blew up on purpose" in setup.milter.log()


@BOTH
def test_quarantine_holds_the_message(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    assert setup.send(message("hold this"), ["bob@example.com"]) == {}
    if setup.mta.name == POSTFIX:
        [queue_id] = setup.postfix.wait_for_held(1)
        # Postfix logs the hold: 3.10 with the milter's reason, 3.7 with a fixed text.
        logged = f"{queue_id}: milter-hold: END-OF-MESSAGE from localhost[127.0.0.1]: "
        assert any(
            logged + reason in setup.postfix.log_text()
            for reason in ("held by the e2e test filter", "milter triggers HOLD action")
        ), setup.postfix.log_text()
        assert "Subject: hold this" in setup.postfix.postcat(queue_id)
    else:
        # Sendmail keeps the filter's reason (the qf file's `q` line).
        assert setup.sendmail.wait_for_held(1) == ["held by the e2e test filter"]
    assert setup.server.delivered() == []


POLICY_CONTACT = b"5.7.1 Contact postmaster@example.com if this is a mistake."


@on(POSTFIX)
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


@on(POSTFIX)
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


@on(POSTFIX)
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


@on(SENDMAIL)
def test_header_index_rules(start: Start) -> None:
    setup = start("tests.e2e.filters:HeaderEdits")
    raw = (
        b"From: a@example.net\r\nTo: bob@example.com\r\nX-Dup: first\r\nX-Del: going\r\n"
        b"X-Dup: second\r\nSubject: headers\r\n\r\nBody.\r\n"
    )
    assert setup.send(raw, ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    names = [name.lower() for name in delivered.message]
    # Sendmail counts insheader's index over the headers it holds, its own Received: first (so
    # 0 is above Received:, and 2 is after it and X-First); the Date: and Message-Id: it adds
    # for a message without them come after the filter's edits, above the client's headers.
    assert names == [
        "x-first", "received", "x-third", "date", "message-id", "from", "to", "x-dup", "x-dup",
        "subject", "x-last",
    ]
    assert delivered.message.get_all("X-Dup") == ["first", "second, changed"]


@on(SENDMAIL)
def test_a_recipient_added_with_esmtp_args_keeps_them(start: Start) -> None:
    setup = start("tests.e2e.filters:RecipientWithArgs")
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert sorted(delivered.recipients) == ["added-par@example.org", "bob@example.com"]
    # Sendmail relays the DSN parameter the filter gave; the client's recipient has none.
    assert setup.sendmail.sink.rcpt_params == {
        "added-par@example.org": "NOTIFY=NEVER", "bob@example.com": ""
    }


@on(SENDMAIL)
def test_macros_as_sendmail_sends_them(start: Start) -> None:
    setup = start("tests.e2e.filters:MacroEcho")
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    got = {k[len("X-Macro-"):].lower(): v for k, v in delivered.message.items()
           if k.startswith("X-Macro-")}
    assert got["connect-j"] == setup.mta.hostname
    assert got["connect-daemon_name"] == "MTA"
    assert got["connect-client_addr"] == "127.0.0.1"
    assert "[127.0.0.1]" in got["connect-_"]
    assert got["envfrom-mail_addr"] == SENDER
    assert got["envrcpt-rcpt_mailer"] == "esmtp"
    assert got["envrcpt-rcpt_addr"] == "bob@example.com"
    # The queue id is known at MAIL already in Sendmail, and is the same at end of message.
    assert got["envfrom-i"] not in ("", "-")
    assert got["eom-i"] == got["envfrom-i"]
    assert got["eom-msg_id"] not in ("", "-")
