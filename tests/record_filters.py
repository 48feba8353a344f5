"""Filters for the record-and-replay tests: every stage, reply kind and action, chosen by the
message (client host, HELO, addresses, Subject, body), so one process serves a whole corpus.
`Stricter` is the "new version": it differs from `Decider` on exactly the messages named in
`STRICTER_CHANGES`."""

from __future__ import annotations

import asyncio

from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    MilterSession,
    ProtocolOpts,
    Stage,
    Status,
    UnixAddress,
)
from pymilterkit.testing import ClientInfo, Envelope

EVERY = (Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.CHANGE_BODY | Actions.ADD_RCPT
         | Actions.ADD_RCPT_PAR | Actions.DELETE_RCPT | Actions.CHANGE_FROM | Actions.QUARANTINE)


class Decider(MilterSession):
    """Answers by what it sees; adds X-Rcpt-Count and X-Queue to every delivered message."""

    actions = EVERY
    protocol = ProtocolOpts.SKIP
    requested_macros = {Stage.CONNECT: ["j", "{daemon_name}"], Stage.ENVRCPT: ["{rcpt_addr}"],
                        Stage.EOM: ["i"]}

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.subject = ""
        if hostname == "blocked.example":
            self.set_reply("554", "5.7.1", "go away")
            return Status.REJECT
        return Status.CONTINUE

    @override
    def on_helo(self, hostname: str) -> Status:
        return Status.TEMPFAIL if hostname == "busy.example" else Status.CONTINUE

    @override
    def on_unknown(self, command: str) -> Status:
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.count, self.subject, self.sender = 0, "", sender
        if "reject-mail@" in sender:
            self.set_reply("550", "5.7.1", "sender refused")
            return Status.REJECT
        if "discard@" in sender:
            return Status.DISCARD
        if "accept@" in sender:
            return Status.ACCEPT
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if recipient.startswith("<nobody@"):
            self.set_reply("550", "5.1.1", "no such user")
            return Status.REJECT
        if recipient.startswith("<later@"):
            return self.later()
        self.count += 1
        return Status.CONTINUE

    def later(self) -> Status:
        return Status.TEMPFAIL

    @override
    def on_data(self) -> Status:
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        if name.lower() == "subject":
            self.subject = value
        return Status.REJECT if "HEADER-REJECT" in value else Status.CONTINUE

    @override
    def on_eoh(self) -> Status:
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        if b"BODY-TEMPFAIL" in chunk:
            self.set_reply("451", "4.3.0", "try again", "later please")
            return Status.TEMPFAIL
        return Status.SKIP if b"SKIPME" in chunk else Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        if "EOM-REJECT" in self.subject:
            self.set_reply("550", "5.7.0", "content refused")
            return Status.REJECT
        if "EOM-DISCARD" in self.subject:
            return Status.DISCARD
        self.add_header("X-Rcpt-Count", str(self.count))
        self.add_header("X-Queue", self.macro("i") or "-")
        if "EVERY" in self.subject:
            self.insert_header(0, "X-First", "1")
            self.change_header("Subject", "[every] " + self.subject)
            self.change_header("X-Remove", None)
            self.change_sender("<bounce@example.net>", "BODY=8BITMIME")
            self.add_recipient("<copy@example.org>")
            self.add_recipient("<copy2@example.org>", "NOTIFY=NEVER")
            self.remove_recipient("<gone@example.org>")
            self.replace_body(b"new body\r\n")
            self.quarantine("held for review")
        return self.verdict()

    def verdict(self) -> Status:
        return Status.CONTINUE


class Stricter(Decider):
    """The next version: `later@` is refused for good; EOM-ACCEPT ends in ACCEPT."""

    @override
    def later(self) -> Status:
        self.set_reply("550", "5.1.1", "gone for good")
        return Status.REJECT

    @override
    def verdict(self) -> Status:
        return Status.ACCEPT if "EOM-ACCEPT" in self.subject else Status.CONTINUE


class AsyncDecider(Decider):
    """`Decider` with async stages that suspend (answered later by the event loop)."""

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:  # type: ignore[override]
        await asyncio.sleep(0.001)
        return Decider.on_rcpt(self, recipient, params)

    @override
    async def on_eom(self) -> Status:  # type: ignore[override]
        await asyncio.sleep(0.001)
        return Decider.on_eom(self)


def message(subject: str, body: str = "hello\r\n", extra: str = "") -> bytes:
    return (f"From: a@example.net\r\nTo: b@example.org\r\nSubject: {subject}\r\n"
            f"X-Remove: x\r\n{extra}\r\n{body}").encode()


def corpus() -> list[tuple[ClientInfo, list[tuple[Envelope, bytes]]]]:
    """Connections covering every stage, reply kind and action of `Decider`."""
    plain = ClientInfo(unknown=("XFOO bar",), macros={"connect": {"j": "mx.example.org"}})
    env = Envelope.of
    return [
        (plain, [
            (env("a@example.net", ["b@example.org", "c@example.org"]), message("hi")),
            (env("a@example.net", ["b@example.org", "nobody@example.org", "later@example.org"],
                 macros={"rcpt": {"{rcpt_addr}": "x"}}), message("mixed rcpts")),
            (env("reject-mail@example.net", ["b@example.org"]), message("no")),
            (env("discard@example.net", ["b@example.org"]), message("dropped")),
            (env("accept@example.net", ["b@example.org"]), message("vip")),
        ]),
        (plain, [
            (env("a@example.net", ["b@example.org"]), message("HEADER-REJECT")),
            (env("a@example.net", ["b@example.org"]), message("x", "BODY-TEMPFAIL\r\n")),
            (env("a@example.net", ["b@example.org"]), message("x", "SKIPME\r\n" * 3)),
            (env("a@example.net", ["b@example.org"]), message("EOM-REJECT")),
            (env("a@example.net", ["b@example.org"]), message("EOM-DISCARD")),
            (env("a@example.net", ["b@example.org", "gone@example.org"], sender_params="SIZE=9"),
             message("EVERY action", "x" * 70000 + "\r\n")),
            (env("a@example.net", ["b@example.org"]), message("EOM-ACCEPT")),
            (env("a@example.net", ["later@example.org", "b@example.org"]), message("late")),
        ]),
        (ClientInfo(hostname="blocked.example"), [(env(), message("blocked"))]),
        (ClientInfo(helo="busy.example"), [(env(), message("busy"))]),
        (ClientInfo(address=None, hostname="unknown"), [(env(), message("no address"))]),
    ]


STRICTER_CHANGES = {"mixed rcpts", "EOM-ACCEPT", "late"}
"""Subjects of the corpus messages on which `Stricter` answers otherwise than `Decider`."""
