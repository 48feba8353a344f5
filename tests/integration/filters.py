"""Filters run by the integration tests, each in its own process (`pymilterkit run`).

The harness-versus-runner scenarios (test_equivalence.py) run them both in-process in the
harness and behind the real libmilter; the results must be equal. Several filters read what
to do from the client host name, so one process serves many connections.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from typing import ClassVar

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
    shutdown,
)
from tests.helpers import EVERY_ACTION, append_line, local_part, requested_sleep


class Recording(MilterSession):
    """Overrides every stage and reports what it saw as X-Seen-* headers at eom."""

    actions = Actions.ADD_HEADER
    protocol = ProtocolOpts.SKIP
    requested_macros = {Stage.CONNECT: ["j", "{daemon_name}"], Stage.EOM: ["i"]}

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.events = [f"connect {hostname} {address!r}"]
        return Status.CONTINUE

    @override
    def on_helo(self, hostname: str) -> Status:
        self.events.append(f"helo {hostname}")
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.events.append(f"mail {sender} {dict(params)}")
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.events.append(f"rcpt {recipient} {dict(params)}")
        return Status.CONTINUE

    @override
    def on_data(self) -> Status:
        self.events.append("data")
        return Status.CONTINUE

    @override
    def on_unknown(self, command: str) -> Status:
        self.events.append(f"unknown {command}")
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.events.append(f"header {name}: {value!r}")
        return Status.CONTINUE

    @override
    def on_eoh(self) -> Status:
        self.events.append("eoh")
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.events.append(f"body {len(chunk)} {chunk[:20]!r}")
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        for n, event in enumerate(self.events):
            self.add_header(f"X-Seen-{n:02d}", event.encode("unicode_escape").decode("ascii"))
        self.add_header("X-Macro-j", str(self.macro("j")))
        self.add_header("X-Macro-i", str(self.macro("{i}")))
        self.add_header("X-Pid", str(os.getpid()))
        self.events = ["(after eom)"]
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self.events.append("abort")

    @override
    def on_close(self) -> None:
        self.events.append("close")


class EveryAction(MilterSession):
    """Uses every message action at end of message."""

    actions = EVERY_ACTION
    padding: ClassVar[int] = 70000
    """Bytes of padding in the new body: more than one body-replacement packet."""

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
        self.replace_body(b"new body\r\n" + b"x" * self.padding + b"\r\n")
        self.replace_body(b"appended\r\n")
        self.quarantine("held for review")
        self.progress()
        return Status.CONTINUE



class EveryActionSmallBody(EveryAction):
    """`EveryAction` with a body that fits one packet (miltertest crashes on larger ones)."""

    padding = 10

class Replies(MilterSession):
    """Rejects recipients by local part with custom single- and multi-line replies."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = local_part(recipient)
        if local == "single":
            self.set_reply("550", "5.7.1", "100% not wanted here")
            return Status.REJECT
        if local == "multi":
            self.set_reply("550", "5.7.1", "line one", "line two", "line three")
            return Status.REJECT
        if local == "temp":
            self.set_reply("451", "4.3.0", "try later")
            return Status.TEMPFAIL
        if local == "plain":
            return Status.REJECT
        return Status.CONTINUE


class Custom(BaseException):
    """A BaseException that is neither an Exception nor KeyboardInterrupt/SystemExit."""


class Faulty(MilterSession):
    """Raises or returns garbage depending on the recipient's local part: `raise`, `garbage`,
    `int`, `noreply`, `exit`, `interrupt`, and the BaseExceptions that are not fatal:
    `cancelled`, `genexit`, `custom`."""

    actions = Actions.ADD_HEADER

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = local_part(recipient)
        if local == "raise":
            raise RuntimeError("boom in on_rcpt\nwith a second line")
        if local == "garbage":
            return "not a status"  # type: ignore[return-value]
        if local == "int":
            return 0  # type: ignore[return-value]
        if local == "noreply":
            return Status.NOREPLY
        if local == "exit":
            raise SystemExit(3)
        if local == "interrupt":
            raise KeyboardInterrupt
        if local == "cancelled":
            raise asyncio.CancelledError("stray cancellation")
        if local == "genexit":
            raise GeneratorExit("stray generator exit")
        if local == "custom":
            raise Custom("custom base exception")
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Served", "yes")
        return Status.CONTINUE



class NoReply(MilterSession):
    """Collects headers without answering (@noreply) and reports them at eom."""

    actions = Actions.ADD_HEADER

    @noreply
    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers = getattr(self, "headers", 0) + 1
        return Status.REJECT  # ignored: no-reply

    @noreply
    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Header-Count", str(getattr(self, "headers", 0)))
        self.headers = 0
        return Status.CONTINUE


class StopFromCallback(MilterSession):
    """Calls shutdown() from inside a stage method."""

    @override
    def on_helo(self, hostname: str) -> Status:
        if hostname == "stop.example":
            shutdown()
        return Status.CONTINUE


class StopFromThread(MilterSession):
    """Calls shutdown() from a Python thread it starts."""

    @override
    def on_helo(self, hostname: str) -> Status:
        if hostname == "stop.example":
            threading.Thread(target=shutdown).start()
        return Status.CONTINUE


class Slow(MilterSession):
    """Blocks in on_helo for the seconds a HELO name `sleep-S` says (bounded to 30).

    With $LIFECYCLE_LOG set, writes "helo done" and "close" there as they happen.
    """

    @override
    def on_helo(self, hostname: str) -> Status:
        seconds = requested_sleep(hostname)
        if seconds is not None:
            time.sleep(seconds)
            append_line("LIFECYCLE_LOG", "helo done")
        return Status.CONTINUE

    @override
    def on_close(self) -> None:
        append_line("LIFECYCLE_LOG", "close")


class Lifecycle(MilterSession):
    """Writes every lifecycle event to the file named by $LIFECYCLE_LOG (one line each)."""

    @staticmethod
    def _write(line: str) -> None:
        append_line("LIFECYCLE_LOG", line)

    _numbers = itertools.count(1)

    def __init__(self) -> None:
        self.ident = f"s{next(self._numbers)}"
        self._write(f"{self.ident} new")

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self._write(f"{self.ident} connect {hostname}")
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self._write(f"{self.ident} mail")
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self._write(f"{self.ident} eom")
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self._write(f"{self.ident} abort")

    @override
    def on_close(self) -> None:
        self._write(f"{self.ident} close")


class FailsOnSecondSession(MilterSession):
    """Its constructor raises for the process's second session (after QUIT_NC, the new
    connection's session is created at connect, inside a stage callback)."""

    _numbers = itertools.count(1)

    def __init__(self) -> None:
        if next(self._numbers) == 2:
            raise RuntimeError("second session refused")

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE


class ThreadStates(MilterSession):
    """Reports at eom how many Python thread states the process holds and how many OS threads
    it has, as `X-Thread-States: <states> <threads>` (the leak check of pinned thread states)."""

    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:
        from pymilterkit import _threadstate

        threads = len(os.listdir("/proc/self/task"))
        self.add_header("X-Thread-States", f"{_threadstate.thread_state_count()} {threads}")
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


class RepliesByStage(MilterSession):
    """Custom SMTP replies at every stage; the client host name picks the case."""

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


class FaultyBySender(MilterSession):
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


class ConnectState(MilterSession):
    """Reports at eom whether state of an earlier connect survived (QUIT_NC reuses the
    milter connection, never the session)."""

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


class HeadersAndBody(MilterSession):
    """Counts header lines and body bytes and reports them at eom (any message shape)."""

    actions = Actions.ADD_HEADER

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers = getattr(self, "headers", 0) + 1
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.body = getattr(self, "body", 0) + len(chunk)
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Shape", f"{getattr(self, 'headers', 0)} {getattr(self, 'body', 0)}")
        self.headers = self.body = 0
        return Status.CONTINUE


class HeadersBodyAndRcpt(HeadersAndBody):
    """HeadersAndBody that also sees recipients: libmilter cannot restart its state machine at
    HELO to reach the body, so after DATA it needs a header or end of headers first."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE


class HeadersBodyAndData(HeadersAndBody):
    """HeadersAndBody with on_data: the MTA sends DATA on any socket."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE

    @override
    def on_data(self) -> Status:
        return Status.CONTINUE
