"""pymilterkit filters behind a real Sendmail 8.17: the coverage of test_postfix_milter.py.

Each test starts a filter with `pymilterkit run` (`MilterProcess`) on a unix socket or on
127.0.0.1 TCP, a private Sendmail (`sendmail_factory`, see sendmail.py) whose only
INPUT_MAIL_FILTER is that socket, sends mail with `smtplib`, and checks what Sendmail relayed to
the SMTP sink, its queue (quarantine), or the SMTP error the client got. The two filters defined
here (`HeaderEdits`, `MacroEcho`) are started by module path like the others.
"""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typing_extensions import override

from examples.footer import FOOTER
from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    MilterSession,
    Stage,
    Status,
    UnixAddress,
)
from pymilterkit.testing import MilterProcess

from .filters import RCPT_REJECT_LINES, REJECT_LINES
from .postfix import free_port
from .sendmail import HOSTNAME, SendmailInstance
from .test_postfix_milter import SENDER, message

ROOT = Path(__file__).resolve().parents[2]


class HeaderEdits(MilterSession):
    """At eom: insert `X-First` at index 0 and `X-Third` at index 2, change the 2nd `X-Dup`,
    delete the 1st `X-Del`, and add `X-Last`: Sendmail's index rules, observable in the order."""

    actions = Actions.ADD_HEADER | Actions.CHANGE_HEADER

    @override
    def on_eom(self) -> Status:
        self.insert_header(0, "X-First", "inserted at 0")
        self.insert_header(2, "X-Third", "inserted at 2")
        self.change_header("X-Dup", "second, changed", index=2)
        self.change_header("X-Del", None)
        self.add_header("X-Last", "added")
        return Status.CONTINUE


class RecipientWithArgs(MilterSession):
    """At eom adds `<added-par@example.org>` with `NOTIFY=NEVER` (smfi_addrcpt_par)."""

    actions = Actions.ADD_RCPT_PAR

    @override
    def on_eom(self) -> Status:
        self.add_recipient("<added-par@example.org>", "NOTIFY=NEVER")
        return Status.CONTINUE


class MacroEcho(MilterSession):
    """Adds `X-Macro-<stage>-<name>: <value>` for each macro Sendmail sent (or "-" if unset)."""

    actions = Actions.ADD_HEADER
    asked = {
        Stage.CONNECT: ("j", "_", "{daemon_name}", "{client_addr}"),
        Stage.ENVFROM: ("i", "{mail_mailer}", "{mail_addr}"),
        Stage.ENVRCPT: ("{rcpt_mailer}", "{rcpt_addr}"),
        Stage.EOM: ("{msg_id}", "i"),
    }

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.seen: list[tuple[str, str, str]] = []
        self._record(Stage.CONNECT)
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self._record(Stage.ENVFROM)
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self._record(Stage.ENVRCPT)
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self._record(Stage.EOM)
        for stage, name, value in self.seen:
            self.add_header(f"X-Macro-{stage}-{name.strip('{}')}", value)
        return Status.CONTINUE

    def _record(self, stage: Stage) -> None:
        for name in self.asked[stage]:
            self.seen.append((stage.name.lower(), name, self.macro(name) or "-"))


@dataclass
class Setup:
    """A filter process and the Sendmail instance that uses it."""

    milter: MilterProcess
    sendmail: SendmailInstance

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.sendmail.smtp_port, timeout=60)

    def send(
        self, msg: bytes, recipients: list[str], sender: str = SENDER
    ) -> dict[str, tuple[int, bytes]]:
        with self.smtp() as smtp:
            smtp.ehlo("client.example.net")
            return smtp.sendmail(sender, recipients, msg)


Start = Callable[..., Setup]


@pytest.fixture
def start(sendmail_factory: Callable[[str], SendmailInstance]) -> Iterator[Start]:
    """`start("module:Class", inet=False)`: a filter and a Sendmail using it.

    The unix sockets live in a 0700 directory of root's: Sendmail (unlike Postfix, whose smtpd
    is user postfix) refuses a socket in a group- or world-writable directory ("unsafe").
    """
    socket_dir = Path(tempfile.mkdtemp(prefix="pmk-smsock-", dir="/tmp"))
    setups: list[Setup] = []
    processes: list[MilterProcess] = []

    def make(target: str, *, inet: bool = False) -> Setup:
        if inet:
            port = free_port()
            spec = f"inet:{port}@127.0.0.1"  # the same spelling for libmilter and Sendmail
        else:
            spec = f"unix:{socket_dir / f'm{len(processes)}.sock'}"
        process = MilterProcess(target, spec, cwd=ROOT)
        processes.append(process)
        process.start()
        setup = Setup(process, sendmail_factory(spec))
        setups.append(setup)
        return setup

    yield make
    for process in processes:
        process.stop()
    for setup in setups:  # shown by pytest only when the test failed
        print(f"--- milter log ({setup.milter.target}) ---\n{setup.milter.log()}")
        print(f"--- sendmail output ---\n{setup.sendmail.log_text()}")
    for process in processes:
        process.__exit__(None, None, None)
    shutil.rmtree(socket_dir, ignore_errors=True)


def test_recipient_counter_on_a_unix_socket(start: Start) -> None:
    setup = start("examples.rcpt_count:RcptCount")
    recipients = ["bob@example.com", "carol@example.org", "dave@example.com"]
    assert setup.send(message(), recipients) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert delivered.message.get_all("X-Rcpt-Count") == ["3"]
    assert sorted(delivered.recipients) == sorted(recipients)


def test_recipient_counter_over_tcp(start: Start) -> None:
    setup = start("examples.rcpt_count:RcptCount", inet=True)
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert delivered.message["X-Rcpt-Count"] == "1"


def test_header_index_rules(start: Start) -> None:
    setup = start(f"{__name__}:HeaderEdits")
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


def test_routing_adds_and_removes_recipients_and_changes_the_sender(start: Start) -> None:
    setup = start("examples.mixins:AuditedRouting")
    recipients = ["sales@example.com", "noreply@example.org", "bob@example.com"]
    assert setup.send(message("order"), recipients, sender="carol@legacy.example.net") == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert sorted(delivered.recipients) == [
        "archive@example.com", "bob@example.com", "sales@example.com"
    ]
    assert delivered.sender == "carol@example.com"
    audit = delivered.message["X-Audit"]
    assert audit.startswith(f"AuditedRouting on {HOSTNAME} queue-id=")
    assert "queue-id=unknown" not in audit
    assert delivered.message["Subject"] == "order"


def test_a_recipient_added_with_esmtp_args_keeps_them(start: Start) -> None:
    setup = start(f"{__name__}:RecipientWithArgs")
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert sorted(delivered.recipients) == ["added-par@example.org", "bob@example.com"]
    # Sendmail relays the DSN parameter the filter gave; the client's recipient has none.
    assert setup.sendmail.sink.rcpt_params == {
        "added-par@example.org": "NOTIFY=NEVER", "bob@example.com": ""
    }


def test_tagger_tags_and_prefixes_the_subject(start: Start) -> None:
    setup = start("examples.tagger:Tagger")
    msg = message("urgent: invoice").replace(b"Subject:", b"X-Tag: spoofed\r\nSubject:", 1)
    assert setup.send(msg, ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert delivered.message.get_all("X-Tag") == ["finance, urgent"]
    assert delivered.message.get_all("Subject") == ["[URGENT] urgent: invoice"]


def test_footer_replaces_the_body(start: Start) -> None:
    setup = start("examples.footer:Footer")
    raw = b"From: a@example.net\r\nTo: bob@example.com\r\nSubject: plain\r\n\r\nJust text.\r\n"
    assert setup.send(raw, ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert delivered.message["MIME-Version"] == "1.0"
    assert delivered.raw.endswith(b"\n\nJust text.\n\n" + FOOTER.encode())


def test_rejection_with_a_multi_line_reply(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        setup.send(message("please reject me"), ["bob@example.com"])
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error == b"\n".join(
        b"5.7.1 " + line.encode() for line in REJECT_LINES)
    assert setup.sendmail.delivered() == []


def test_recipient_rejection_with_a_multi_line_reply(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    refused = setup.send(message(), ["blocked@example.com", "bob@example.com"])
    # Sendmail puts "<recipient>... " before the first line (Postfix sends the lines as given).
    lines = ["<blocked@example.com>... " + RCPT_REJECT_LINES[0], *RCPT_REJECT_LINES[1:]]
    assert refused == {
        "blocked@example.com": (550, b"\n".join(b"5.7.1 " + line.encode() for line in lines)),
    }
    [delivered] = setup.sendmail.wait_for_delivery(1)
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
        smtp.rset()
        assert smtp.sendmail(SENDER, ["bob@example.com"], message("after the failure")) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    assert delivered.message["Subject"] == "after the failure"
    assert "the test filter blew up on purpose" in setup.milter.log()


def test_quarantine_keeps_the_message_in_the_queue_with_the_reason(start: Start) -> None:
    setup = start("tests.e2e.filters:Verdicts")
    assert setup.send(message("hold this"), ["bob@example.com"]) == {}
    # Unlike Postfix, Sendmail keeps the filter's reason (the qf file's `q` line).
    assert setup.sendmail.wait_for_held(1) == ["held by the e2e test filter"]
    assert setup.sendmail.delivered() == []


def test_macros_as_sendmail_sends_them(start: Start) -> None:
    setup = start(f"{__name__}:MacroEcho")
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.sendmail.wait_for_delivery(1)
    got = {k[len("X-Macro-"):].lower(): v for k, v in delivered.message.items()
           if k.startswith("X-Macro-")}
    assert got["connect-j"] == HOSTNAME
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
