"""Filters run by the integration tests, each in its own process (`pymilterkit run`)."""

from __future__ import annotations

import itertools
import os
import threading

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

EVERY_ACTION = (
    Actions.ADD_HEADER
    | Actions.CHANGE_HEADER
    | Actions.CHANGE_FROM
    | Actions.ADD_RCPT
    | Actions.ADD_RCPT_PAR
    | Actions.DELETE_RCPT
    | Actions.CHANGE_BODY
    | Actions.QUARANTINE
)


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
    """Uses every message action at eom."""

    actions = EVERY_ACTION

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Added", "yes")
        self.insert_header(0, "X-Inserted", "first")
        self.change_header("Subject", "changed subject")
        self.change_header("X-Remove-Me", None)
        self.change_sender("<new-sender@example.org>", "RET=HDRS")
        self.add_recipient("<added@example.com>")
        self.add_recipient("<added-par@example.com>", "NOTIFY=NEVER")
        self.remove_recipient("<removed@example.com>")
        self.replace_body(b"new body, part one\r\n")
        self.replace_body(b"part two\r\n")
        self.progress()
        self.quarantine("held for review")
        return Status.CONTINUE


class Replies(MilterSession):
    """Rejects recipients by local part with custom single- and multi-line replies."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = recipient.strip("<>").split("@")[0]
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


class Faulty(MilterSession):
    """Raises or returns garbage depending on the recipient; counts connections."""

    actions = Actions.ADD_HEADER

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = recipient.strip("<>").split("@")[0]
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
    """Blocks in on_helo for the number of seconds the HELO name says (bounded to 30).

    With $LIFECYCLE_LOG set, writes "helo done" and "close" there as they happen.
    """

    @override
    def on_helo(self, hostname: str) -> Status:
        import time

        if hostname.startswith("sleep-"):
            time.sleep(min(float(hostname.split("-", 1)[1]), 30.0))
            Lifecycle.note("helo done")
        return Status.CONTINUE

    @override
    def on_close(self) -> None:
        Lifecycle.note("close")


class Lifecycle(MilterSession):
    """Writes every lifecycle event to the file named by $LIFECYCLE_LOG (one line each)."""

    @classmethod
    def _write(cls, line: str) -> None:
        with open(os.environ["LIFECYCLE_LOG"], "a") as log:
            log.write(line + "\n")

    @classmethod
    def note(cls, line: str) -> None:
        """Write `line` if $LIFECYCLE_LOG is set (for filters that only log on request)."""
        if "LIFECYCLE_LOG" in os.environ:
            cls._write(line)

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
        from pymilterkit import _libmilter

        threads = len(os.listdir("/proc/self/task"))
        self.add_header("X-Thread-States", f"{_libmilter.thread_state_count()} {threads}")
        return Status.CONTINUE
