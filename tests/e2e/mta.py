"""A filter behind either MTA of the end-to-end tests, and what the tests expect to differ.

The `start` fixture (conftest.py) runs a filter with `pymilterkit run` (`MilterProcess`) on a
unix socket or on 127.0.0.1 TCP, and a private MTA whose only milter it is: Postfix
(`postfix.py`) unless the test is parametrized over `mta` (see `on`), Sendmail (`sendmail.py`)
if it asks for it. `Setup.send` talks SMTP to that MTA; `Mta` holds, per MTA, the facts that
differ between them, so a test written once states each difference in one place.
"""

from __future__ import annotations

import email.policy
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

import pytest

from pymilterkit.testing import MilterProcess

from .postfix import PostfixInstance
from .sendmail import HOSTNAME as SENDMAIL_HOSTNAME
from .sendmail import SendmailInstance

CRLF = email.policy.default.clone(linesep="\r\n")
SENDER = "alice@example.net"
POSTFIX = "postfix"
SENDMAIL = "sendmail"


def message(subject: str = "hello", body: str = "Hello Bob.\n") -> bytes:
    """A small text message from `SENDER` to bob@example.com, with CRLF line ends."""
    msg = EmailMessage()
    msg["From"] = f"Alice <{SENDER}>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes(policy=CRLF)


@dataclass(frozen=True)
class Mta:
    """What differs between the MTAs, as the tests see it."""

    name: str
    hostname: str
    """The MTA's own host name (macro `j`)."""
    smtp_timeout: float
    """Seconds the SMTP client waits (Sendmail answers some commands only after its milter)."""
    rcpt_reply_prefix: str
    """What the MTA writes before the first line of a milter's reply to a recipient."""
    tempfail_reply: bytes
    """The MTA's own text of the 451 it answers when the filter failed."""


MTAS = {
    POSTFIX: Mta(
        POSTFIX, "mta.pymilterkit.test", smtp_timeout=30, rcpt_reply_prefix="",
        tempfail_reply=b"4.7.1 Service unavailable - try again later",
    ),
    SENDMAIL: Mta(
        SENDMAIL, SENDMAIL_HOSTNAME, smtp_timeout=60,
        rcpt_reply_prefix="<blocked@example.com>... ",
        tempfail_reply=b"4.3.2 Please try again later",
    ),
}  # fmt: skip


def on(*names: str) -> pytest.MarkDecorator:
    """Run the test behind each MTA named (`@on(POSTFIX, SENDMAIL)`); the default is Postfix."""
    return pytest.mark.parametrize("mta", [MTAS[name] for name in names], indirect=True,
                                   ids=list(names))


@dataclass
class Setup:
    """A filter process and the MTA that uses it."""

    milter: MilterProcess
    server: PostfixInstance | SendmailInstance
    mta: Mta

    @property
    def postfix(self) -> PostfixInstance:
        """The MTA, for a test that only runs behind Postfix."""
        assert isinstance(self.server, PostfixInstance)
        return self.server

    @property
    def sendmail(self) -> SendmailInstance:
        """The MTA, for a test that only runs behind Sendmail."""
        assert isinstance(self.server, SendmailInstance)
        return self.server

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.server.smtp_port, timeout=self.mta.smtp_timeout)

    def send(
        self,
        msg: bytes,
        recipients: list[str],
        sender: str = SENDER,
        helo: str = "client.example.net",
    ) -> dict[str, tuple[int, bytes]]:
        """Send one message on a new SMTP connection; the recipients the MTA refused."""
        with self.smtp() as smtp:
            smtp.ehlo(helo)
            return smtp.sendmail(sender, recipients, msg)


Start = Callable[..., Setup]
"""`start("module:Class", inet=False, extra_config=None, args=(), env=None) -> Setup`."""
