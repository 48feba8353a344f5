"""Filters for the harness-versus-runner scenarios (tests/integration/test_equivalence.py).

Each runs in-process in the harness and as `pymilterkit run tests.integration.
equivalence_filters:NAME` behind the real libmilter; the results must be equal. Several
filters read what to do from the client host name, so one process serves many connections.
"""

from __future__ import annotations

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
    noreply,
)

from .filters import EVERY_ACTION


class EveryAction(MilterSession):
    """Uses every message action at end of message."""

    actions = EVERY_ACTION

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Added", "one")
        self.add_header("X-Folded", "first line\n\tsecond line")
        self.insert_header(0, "X-Inserted", "at the top")
        self.change_header("Subject", "changed subject")
        self.change_header("X-Remove-Me", None)
        self.change_header("X-Absent", "appended", index=3)
        self.change_sender("<new-sender@example.net>", "RET=HDRS")
        self.add_recipient("<added@example.org>")
        self.add_recipient("<added-par@example.org>", "NOTIFY=NEVER")
        self.remove_recipient("<rcpt@example.org>")
        self.progress()
        self.replace_body(b"new body\r\n" + b"x" * 70000 + b"\r\n")
        self.replace_body(b"appended\r\n")
        self.quarantine("held for review")
        self.progress()
        return Status.CONTINUE


class VerdictAt(MilterSession):
    """The client host name says `VERDICT.STAGE` (e.g. `reject.header`): answer that there.

    At RCPT only recipients containing "bad" get the verdict. Every message that gets to the
    end is tagged with what the filter saw.
    """

    actions = Actions.ADD_HEADER

    def _at(self, stage: str) -> Status:
        if self.where == stage:
            return Status[self.verdict.upper()]
        return Status.CONTINUE

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.verdict, _, self.where = hostname.partition(".")
        self.seen: list[str] = []
        self.messages = 0
        return self._at("connect")

    @override
    def on_helo(self, hostname: str) -> Status:
        return self._at("helo")

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.messages += 1
        self.seen = ["mail"]
        return self._at("mail")

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.seen.append(f"rcpt {recipient}")
        if "bad" in recipient:
            return self._at("rcpt")
        return Status.CONTINUE

    @override
    def on_data(self) -> Status:
        self.seen.append("data")
        return self._at("data")

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.seen.append(f"header {name}")
        return self._at("header")

    @override
    def on_eoh(self) -> Status:
        self.seen.append("eoh")
        return self._at("eoh")

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.seen.append(f"body {len(chunk)}")
        return self._at("body")

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Seen", ", ".join(self.seen))
        self.add_header("X-Message-Number", str(self.messages))
        return self._at("eom")

    @override
    def on_abort(self) -> None:
        self.seen.append("abort")


class Replies(MilterSession):
    """Custom SMTP replies; the client host name picks the case."""

    actions = Actions.ADD_HEADER

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.case = hostname
        if self.case == "connect":
            self.set_reply("554", "5.7.1", "go away")
            return Status.REJECT
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        if self.case == "mail" and "bad" in sender:
            self.set_reply("550", "5.7.1", "sender refused: 100% sure")
            return Status.REJECT
        if self.case == "noxcode" and "bad" in sender:
            self.set_reply("550", None, "no enhanced code")
            return Status.REJECT
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if self.case == "rcpt" and "bad" in recipient:
            self.set_reply("450", "4.2.0", "mailbox busy")
            return Status.TEMPFAIL
        if self.case == "mismatch" and "bad" in recipient:
            # A 4xx reply with REJECT: libmilter sends a plain reject and keeps the text
            # for the next TEMPFAIL, which comes at end of message.
            self.set_reply("451", "4.3.0", "kept for later")
            return Status.REJECT
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        if self.case == "multiline":
            self.set_reply("550", "5.7.1", "first line", "second line", "third line")
            return Status.REJECT
        if self.case == "mismatch":
            return Status.TEMPFAIL
        if self.case == "bare":
            return Status.REJECT
        return Status.CONTINUE


class NoReplyStages(MilterSession):
    """Collects recipients and headers without answering; acts at end of message."""

    actions = Actions.ADD_HEADER

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.rcpts: list[str] = []
        self.headers: list[str] = []
        return Status.CONTINUE

    @noreply
    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.rcpts.append(recipient)
        return Status.NOREPLY

    @noreply
    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers.append(f"{name}={value}")
        # Ignored: a no-reply stage cannot reject.
        return Status.REJECT

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Rcpts", " ".join(self.rcpts))
        self.add_header("X-Headers", " | ".join(self.headers))
        return Status.CONTINUE


class SkipBody(MilterSession):
    """Reads the first body chunk only (SKIP), then reports how many it saw."""

    actions = Actions.ADD_HEADER
    protocol = ProtocolOpts.SKIP

    @override
    def on_eoh(self) -> Status:
        self.chunks = 0
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.chunks += 1
        return Status.SKIP

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Chunks", str(self.chunks))
        return Status.CONTINUE


class SkipHeaders(MilterSession):
    """SKIP at the second header: Postfix sends no more headers, then end of headers."""

    actions = Actions.ADD_HEADER
    protocol = ProtocolOpts.SKIP

    @override
    def on_data(self) -> Status:
        self.names: list[str] = []
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.names.append(name)
        return Status.SKIP if len(self.names) == 2 else Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Header-Names", ",".join(self.names))
        return Status.CONTINUE


class AbortCounter(MilterSession):
    """Counts aborts and messages across a connection; rejects senders containing "bad"."""

    actions = Actions.ADD_HEADER

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.aborts = 0
        self.messages = 0
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.messages += 1
        return Status.REJECT if "bad" in sender else Status.CONTINUE

    @override
    def on_data(self) -> Status:
        return Status.TEMPFAIL if self.messages == 2 else Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Aborts", str(self.aborts))
        self.add_header("X-Messages", str(self.messages))
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self.aborts += 1


class EomAndAbortOnly(MilterSession):
    """Overrides only on_eom and on_abort: the MTA sends no envelope stages at all."""

    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Aborted-Before", str(getattr(self, "aborts", 0)))
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self.aborts = getattr(self, "aborts", 0) + 1


class Faulty(MilterSession):
    """Raises, returns garbage, or uses an undeclared action, depending on the sender."""

    actions = Actions.ADD_HEADER

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.sender = sender
        if "raise-mail" in sender:
            raise RuntimeError("boom in on_mail")
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        if "garbage" in self.sender:
            return "not a status"  # type: ignore[return-value]
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        if "undeclared" in self.sender:
            self.change_sender("<x@example.net>")
        if "raise-eom" in self.sender:
            self.add_header("X-Before", "error")
            raise ValueError("boom in on_eom")
        self.add_header("X-Fine", "yes")
        return Status.CONTINUE


class Unknown(MilterSession):
    """Refuses unknown SMTP commands starting with X; accepts the rest."""

    actions = Actions.ADD_HEADER

    @override
    def on_unknown(self, command: str) -> Status:
        if command.startswith("X"):
            self.set_reply("502", "5.5.2", "no such command")
            return Status.REJECT
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Ok", "1")
        return Status.CONTINUE


class Macros(MilterSession):
    """Asks for macros and reports them."""

    actions = Actions.ADD_HEADER
    requested_macros = {
        Stage.CONNECT: ["j", "{daemon_name}"],
        Stage.ENVRCPT: ["{rcpt_addr}"],
        Stage.EOM: ["i", "{mail_addr}"],
    }

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.rcpt_addr = self.macro("rcpt_addr") or "-"
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        for name in ("j", "{j}", "{daemon_name}", "i", "{mail_addr}", "{rcpt_addr}", "v"):
            self.add_header("X-Macro", f"{name}={self.macro(name)}")
        return Status.CONTINUE


class DefaultMacros(MilterSession):
    """Reports Postfix-like default macros (no requested list)."""

    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:
        for name in ("j", "_", "{daemon_name}", "i", "{mail_addr}", "{rcpt_addr}"):
            self.add_header("X-Macro", f"{name}={self.macro(name)}")
        return Status.CONTINUE


class Raw(MilterSession):
    """Echoes 8-bit header values, the envelope and the client address back."""

    actions = Actions.ADD_HEADER | Actions.CHANGE_BODY

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.client = f"{hostname} {address!r}"
        return Status.CONTINUE

    @override
    def on_helo(self, hostname: str) -> Status:
        self.helo = hostname
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.envelope = [f"{sender} {sorted(params.items())}"]
        self.headers: list[str] = []
        self.body = b""
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.envelope.append(f"{recipient} {params!s}")
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers.append(f"{name}:{value}")
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.body += chunk
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Client", self.client)
        self.add_header("X-Helo", self.helo)
        self.add_header("X-Envelope", " | ".join(self.envelope))
        for header in self.headers:
            self.add_header("X-Header", header)
        self.replace_body(self.body.upper())
        return Status.CONTINUE


class LeadingSpace(MilterSession):
    """Negotiates HDR_LEADSPC and echoes header values verbatim."""

    actions = Actions.ADD_HEADER
    protocol = ProtocolOpts.HDR_LEADSPC

    @override
    def on_data(self) -> Status:
        self.values: list[str] = []
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.values.append(repr(value))
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Values", " ".join(self.values))
        return Status.CONTINUE


class Lifecycle(MilterSession):
    """Counts connects on one milter connection (QUIT_NC reuses it)."""

    actions = Actions.ADD_HEADER

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.host = hostname
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Host", self.host)
        self.add_header("X-Has-Old-State", str(hasattr(self, "old")))
        self.old = True
        return Status.CONTINUE
