"""Filters of the reliability tests (soak, fuzz, faults), each run with `pymilterkit run`.

`SoakEveryAction` overrides every stage and uses every message action, and raises an exception
at the stage the conversation asks for, so the right answer is always known in advance:

* connect host name `fault-connect` / HELO name `fault-helo` / a sender whose local part is
  `fault-mail`: the exception is raised in that stage;
* a recipient `fault-rcpt@...` raises in `on_rcpt` (only that recipient is refused);
* a recipient `fault-STAGE@...` (STAGE = data, header, eoh, body, eom, abort) is accepted and
  raises later, in that stage of the same message;
* connect host name `fault-close` raises in `on_close`;
* a recipient `reject@...` is rejected with a two-line custom reply containing `%`.

At end of message it reports what it saw (recipient count, a digest of every header and of the
body) as headers, so the driver can check that every byte arrived. Every injected exception
message contains CR, LF and ESC, which the library must escape in its log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    LibmilterError,
    MilterSession,
    Status,
    UnixAddress,
)
from tests.helpers import EVERY_ACTION, append_line, local_part, requested_sleep

REJECT_REPLY = ("550", "5.7.1", "100% refused by the soak filter", "second line")
NEW_SENDER = ("<new-sender@example.org>", "RET=HDRS")
ADDED = ("<added@example.com>", "<added-par@example.com>", "NOTIFY=NEVER")
QUARANTINE_REASON = "soak: held"


class InjectedFault(Exception):
    """Raised on purpose by the test filters."""


class _QuietFaults(logging.Filter):
    """Lets the first few injected-fault tracebacks through, then only counts them.

    A soak run injects hundreds of thousands of faults; their tracebacks would fill the disk.
    Likewise for actions refused by libmilter because the client already hung up.
    """

    shown = 0
    suppressed = 0
    lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (InjectedFault, LibmilterError)):
            return True
        with self.lock:
            if _QuietFaults.shown < 5:
                _QuietFaults.shown += 1
                return True
            _QuietFaults.suppressed += 1
        return False


def quiet_injected_faults() -> None:
    """Install `_QuietFaults` first on the pymilterkit logger (before the escaping filter)."""
    logger = logging.getLogger("pymilterkit")
    if not any(isinstance(f, _QuietFaults) for f in logger.filters):
        logger.filters.insert(0, _QuietFaults())


def _fault(stage: str, detail: str) -> InjectedFault:
    return InjectedFault(f"injected fault in {stage} for {detail}\r\nInjected: line\x1b[31m")


class SoakEveryAction(MilterSession):
    """Every stage, every action, faults on request (see the module docstring)."""

    actions = EVERY_ACTION

    def __init__(self) -> None:
        self.host = ""
        self._reset()

    def _reset(self) -> None:
        self.recipients: list[str] = []
        self.faults: set[str] = set()
        self.header_count = 0
        self.header_digest = hashlib.sha256()
        self.body_size = 0
        self.body_digest = hashlib.sha256()

    def _check(self, stage: str) -> None:
        if stage in self.faults:
            raise _fault(stage, ",".join(sorted(self.faults)))

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.host = hostname
        if hostname == "fault-connect":
            raise _fault("on_connect", hostname)
        return Status.CONTINUE

    @override
    def on_helo(self, hostname: str) -> Status:
        if hostname == "fault-helo":
            raise _fault("on_helo", hostname)
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self._reset()
        if local_part(sender) == "fault-mail":
            raise _fault("on_mail", sender)
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = local_part(recipient)
        if local == "fault-rcpt":
            raise _fault("on_rcpt", recipient)
        if local == "reject":
            self.set_reply(*REJECT_REPLY)
            return Status.REJECT
        if local.startswith("fault-"):
            self.faults.add(local[len("fault-") :])
        self.recipients.append(recipient)
        return Status.CONTINUE

    @override
    def on_data(self) -> Status:
        self._check("data")
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self._check("header")
        self.header_count += 1
        self.header_digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        self.header_digest.update(value.encode("utf-8", "surrogateescape") + b"\0")
        return Status.CONTINUE

    @override
    def on_eoh(self) -> Status:
        self._check("eoh")
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self._check("body")
        self.body_size += len(chunk)
        self.body_digest.update(chunk)
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self._check("eom")
        self.add_header("X-Rcpt-Count", str(len(self.recipients)))
        self.add_header(
            "X-Header-Digest", f"{self.header_count}:{self.header_digest.hexdigest()[:16]}"
        )
        self.add_header("X-Body-Digest", f"{self.body_size}:{self.body_digest.hexdigest()[:16]}")
        self.insert_header(0, "X-Inserted", "first")
        self.change_header("Subject", "changed by the soak filter")
        self.change_header("X-Remove-Me", None)
        self.change_sender(*NEW_SENDER)
        self.add_recipient(ADDED[0])
        self.add_recipient(ADDED[1], ADDED[2])
        # The first recipient that can be named back to the MTA (hostile input may send an
        # empty one, or one with CR/LF, which the library rightly refuses to pass on).
        removable = [r for r in self.recipients if r.strip() and not set(r) & set("\r\n\0")]
        if removable:
            self.remove_recipient(removable[0])
        self.replace_body(f"soak body {self.body_size}\r\n".encode())
        self.progress()
        self.quarantine(QUARANTINE_REASON)
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        if "abort" in self.faults:
            self.faults.discard("abort")
            raise _fault("on_abort", "abort")

    @override
    def on_close(self) -> None:
        if self.host == "fault-close":
            raise _fault("on_close", self.host)


class Blocking(MilterSession):
    """Blocks in on_mail for the seconds the sender's local part says (`sleep-5@...`)."""

    actions = Actions.ADD_HEADER

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        seconds = requested_sleep(local_part(sender))
        if seconds is not None:
            append_line("BLOCKING_PID_FILE", str(os.getpid()))  # which process is blocked
            time.sleep(seconds)
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Pid", str(os.getpid()))
        return Status.CONTINUE


class RaisesWithRecipient(MilterSession):
    """Raises in on_rcpt with the recipient in the message (for the log-escaping test)."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if local_part(recipient).startswith("boom"):
            raise ValueError(f"bad recipient {recipient}")
        return Status.CONTINUE



class FuzzTarget(SoakEveryAction):
    """`SoakEveryAction` for the fuzzer, reading macros at every stage (present and absent
    names: fuzzed macro packets reach libmilter's macro lists this way, issue 19.3). A hostile
    client that hangs up while the end-of-message actions are sent makes libmilter refuse them;
    a careful filter expects that."""

    def _macros(self) -> None:
        for name in ("j", "i", "{daemon_name}", "{mail_addr}", "{rcpt_addr}", "absent"):
            value = self.macro(name)
            assert value is None or isinstance(value, str)

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self._macros()
        return super().on_connect(hostname, address)

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self._macros()
        return super().on_mail(sender, params)

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self._macros()
        return super().on_rcpt(recipient, params)

    @override
    def on_eom(self) -> Status:
        self._macros()
        try:
            return super().on_eom()
        except LibmilterError:
            return Status.CONTINUE


class Echo(MilterSession):
    """Passes untrusted input straight to every API that emits protocol text.

    A careless filter: the recipient goes into a reply line (local part `reply`), and at end
    of message the first recipient and the `X-Echo` header's value go into a header, the
    sender, a new recipient, its parameters and the quarantine reason, in the order given by
    the sender's local part (`hdr`, `from`, `rcpt`, `par`, `quar`). The library must refuse
    CR, LF and NUL in all of them, so nothing can be injected.
    """

    actions = EVERY_ACTION

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.first = local_part(sender)
        self.recipients: list[str] = []
        self.echo = ""
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if local_part(recipient).startswith("reply"):
            self.set_reply("550", "5.1.1", f"no such user {recipient}")
            return Status.REJECT
        self.recipients.append(recipient)
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        if name == "X-Echo":
            self.echo = value
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        rcpt = self.recipients[0]
        steps = {
            "hdr": lambda: self.add_header("X-Echo", self.echo),
            "from": lambda: self.change_sender(rcpt),
            "rcpt": lambda: self.add_recipient(rcpt),
            "par": lambda: self.add_recipient("<ok@example.com>", self.echo),
            "quar": lambda: self.quarantine(self.echo),
        }
        steps[self.first]()
        return Status.CONTINUE


quiet_injected_faults()
