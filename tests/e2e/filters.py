"""Test-only filters for the end-to-end tests behind a real Postfix or Sendmail (`test_milter.py`).

Each is started with `pymilterkit run tests.e2e.filters:NAME` in its own process. What they do
is chosen by the message, so one filter process serves several messages of a test.
"""

from __future__ import annotations

from ipaddress import ip_network

from typing_extensions import override

from examples.policy import ConnectionPolicy
from examples.rcpt_count import RcptCount
from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    MilterSession,
    Stage,
    Status,
    UnixAddress,
    noreply,
)

REJECT_LINES = (
    "Your message was rejected by the content filter.",
    "Reason: the subject says so.",
    "See https://example.com/policy for details.",
)
RCPT_REJECT_LINES = ("blocked@example.com does not take mail from you.", "Go away.")


class Verdicts(MilterSession):
    """A verdict chosen by the Subject (with `X-Seen: yes` added to mail that gets through):

    * RCPT `blocked@example.com`: 550 5.7.1 with the multi-line `RCPT_REJECT_LINES`;
    * Subject containing `reject`: 550 5.7.1 with the multi-line `REJECT_LINES` at eom;
    * `boom`: the filter raises (the runner answers TEMPFAIL);
    * `hold`: the message is quarantined (Postfix puts it on hold).
    """

    actions = Actions.ADD_HEADER | Actions.QUARANTINE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.subject = ""
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if recipient.strip("<>").lower() == "blocked@example.com":
            self.set_reply("550", "5.7.1", *RCPT_REJECT_LINES)
            return Status.REJECT
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        if name.lower() == "subject":
            self.subject = value.lower()
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        if "reject" in self.subject:
            self.set_reply("550", "5.7.1", *REJECT_LINES)
            return Status.REJECT
        if "boom" in self.subject:
            raise RuntimeError("the test filter blew up on purpose")
        if "hold" in self.subject:
            self.quarantine("held by the e2e test filter")
            return Status.CONTINUE
        self.add_header("X-Seen", "yes")
        return Status.CONTINUE


class LoopbackBlocked(ConnectionPolicy):
    """The connection policy example with 127.0.0.0/8 blocked (Postfix's tests connect there)."""

    blocked_networks = (ip_network("127.0.0.0/8"),)


class QuietEverywhere(RcptCount):
    """The recipient counter with every stage but the end of message @noreply.

    On TCP this is the case where the MTA writes the most unanswered packets in a row
    (connect, helo, mail, each recipient, each header, end of headers, body).
    """

    @noreply
    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        return Status.CONTINUE

    @noreply
    @override
    def on_helo(self, hostname: str) -> Status:
        return Status.CONTINUE

    @noreply
    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return super().on_mail(sender, params)

    @noreply
    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return super().on_rcpt(recipient, params)

    @noreply
    @override
    def on_header(self, name: str, value: str) -> Status:
        return Status.CONTINUE

    @noreply
    @override
    def on_eoh(self) -> Status:
        return Status.CONTINUE

    @noreply
    @override
    def on_body(self, chunk: bytes) -> Status:
        return Status.CONTINUE


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
