"""A throwaway, private Sendmail for end-to-end tests, beside the Postfix of ``postfix.py``.

Theory of operation
-------------------
Debian's ``sendmail-bin`` conflicts with ``postfix`` (both provide mail-transport-agent), so
``.ci/bootstrap.sh`` does not install it: it unpacks the .debs with ``dpkg-deb -x`` into
`SENDMAIL_ROOT`. Nothing under /etc/mail is read or written. `SendmailInstance` builds::

    BASE/              (/tmp/pmk-sm-XXXXXXXX)
      sendmail.mc      written here; ``m4`` turns it into sendmail.cf with sendmail-cf's m4 files
      sendmail.cf      -C for the daemon
      queue/           its own QueueDirectory (quarantined messages become ``hf*`` files here)
      service.switch   hosts from files only: no DNS lookups
      sendmail.out     the daemon's stdout/stderr (Sendmail itself logs only to syslog)

The daemon (``sendmail -bD``, in the foreground, as root) listens on ``127.0.0.1:<free port>``
and relays everything, by SMART_HOST, to an `SmtpSink` on another free loopback port in this
process. It runs in its own UTS namespace (``unshare --uts``) with the host name
``mta.example.test``: an unqualified host name (this machine's is ``vm``) makes Sendmail sleep
60 s at start ("My unqualified host name ... unknown"). It is stopped by its PID only.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from email.parser import BytesParser
from pathlib import Path
from typing import Self

from .postfix import DeliveredMessage, _listening, _pid_alive, free_port

__all__ = ["SENDMAIL_ROOT", "SendmailError", "SendmailInstance", "SmtpSink"]

SENDMAIL_ROOT = Path(os.environ.get("PMK_SENDMAIL_ROOT", "/opt/pmk-sendmail"))
SENDMAIL = SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"
CF_DIR = SENDMAIL_ROOT / "usr/share/sendmail/cf"
HOSTNAME = "mta.example.test"

# The macros Sendmail is told to send (confMILTER_MACROS_*), per stage.
MACROS: Mapping[str, str] = {
    "CONNECT": "j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}, {client_port}",
    "HELO": "{tls_version}, {cipher}, {client_resolve}",
    "ENVFROM": "i, {auth_type}, {mail_mailer}, {mail_host}, {mail_addr}",
    "ENVRCPT": "{rcpt_mailer}, {rcpt_host}, {rcpt_addr}",
    "EOM": "{msg_id}, i",
}


class SendmailError(RuntimeError):
    """The test Sendmail could not be built, started or stopped, or did not deliver in time."""


class SmtpSink:
    """A minimal SMTP server on 127.0.0.1 (asyncio, in a thread) that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[DeliveredMessage] = []
        self.rcpt_params: dict[str, str] = {}
        """The ESMTP parameters of each RCPT TO the sink was given (it offers DSN)."""
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> Self:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, "127.0.0.1", 0), self._loop
        )
        self._server = started.result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if not self._thread.is_alive():  # never started
            self._loop.close()
            return
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender, recipients = "", list[str]()
        writer.write(b"220 sink.example.test ESMTP test sink\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-sink.example.test\r\n250-DSN\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                sender, recipients = _address(line), []
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                recipients.append(_address(line))
                with self._lock:
                    self.rcpt_params[recipients[-1]] = _params(line)
                writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                lines = []
                while (data := await reader.readline()) not in (b".\r\n", b""):
                    lines.append(data[1:] if data.startswith(b".") else data)
                raw = b"".join(lines).replace(b"\r\n", b"\n")
                message = BytesParser(policy=email.policy.default).parsebytes(raw)
                with self._lock:
                    self.messages.append(
                        DeliveredMessage(
                            sender=sender,
                            recipients=tuple(recipients),
                            raw=raw,
                            queue_id="",
                            message=message,
                        )
                    )
                writer.write(b"250 2.0.0 kept\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                break
            else:  # RSET, NOOP
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
        writer.close()

    def delivered(self) -> list[DeliveredMessage]:
        with self._lock:
            return list(self.messages)


def _address(line: bytes) -> str:
    """The address between <> of a MAIL FROM / RCPT TO line ("" for <>)."""
    text = line.decode("utf-8", "surrogateescape")
    return text[text.index("<") + 1 : text.index(">")] if "<" in text else ""


def _params(line: bytes) -> str:
    """The ESMTP parameters after the address of a MAIL FROM / RCPT TO line."""
    text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
    return text[text.index(">") + 1 :].strip() if ">" in text else ""


class SendmailInstance:
    """One private Sendmail daemon whose only milter is ``milter_spec`` (``unix:/path`` or
    ``inet:PORT@127.0.0.1``, Sendmail's spelling)."""

    def __init__(self, milter_spec: str) -> None:
        if not SENDMAIL.exists() or not (CF_DIR / "m4/cf.m4").exists():
            raise SendmailError(
                f"no unpacked Sendmail in {SENDMAIL_ROOT}: run .ci/bootstrap.sh as root"
            )
        self.milter_spec = milter_spec
        self.base = Path(tempfile.mkdtemp(prefix="pmk-sm-", dir="/tmp"))
        self.queue = self.base / "queue"
        self.smtp_port = free_port()
        self.sink = SmtpSink()
        self._process: subprocess.Popen[bytes] | None = None

    def mc(self) -> str:
        """The m4 source of this instance's sendmail.cf."""
        b = self.base
        lines = [
            f"include(`{CF_DIR}/m4/cf.m4')",
            "VERSIONID(`pymilterkit e2e')",
            "OSTYPE(`linux')",
            f"define(`confDOMAIN_NAME', `{HOSTNAME}')",
            "define(`SMART_HOST', `esmtp:[127.0.0.1]')",
            f"define(`ESMTP_MAILER_ARGS', `TCP $h {self.sink.port}')",
            "define(`ALIAS_FILE', `')",
            f"define(`QUEUE_DIR', `{self.queue}')",
            f"define(`confPID_FILE', `{b}/sendmail.pid')",
            f"define(`STATUS_FILE', `{b}/statistics')",
            f"define(`HELP_FILE', `{b}/helpfile')",
            f"define(`confSERVICE_SWITCH_FILE', `{b}/service.switch')",
            "define(`confDONT_PROBE_INTERFACES', `True')",
            "define(`confDELIVERY_MODE', `background')",
            "define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')",
            "define(`confTO_IDENT', `0s')",
            *(f"define(`confMILTER_MACROS_{stage}', `{names}')" for stage, names in MACROS.items()),
            "FEATURE(`nocanonify')",
            "FEATURE(`accept_unresolvable_domains')",
            "FEATURE(`no_default_msa')",
            f"DAEMON_OPTIONS(`Port={self.smtp_port}, Addr=127.0.0.1, Name=MTA')",
            f"INPUT_MAIL_FILTER(`pmk', `S={self.milter_spec}, F=T, T=C:10s;S:30s;R:30s;E:60s')",
            "MAILER(`smtp')",
        ]
        return "divert(-1)\n" + "\n".join(lines[:1]) + "\ndivert(0)dnl\n" + "".join(
            line + "dnl\n" for line in lines[1:]
        )

    def start(self, timeout: float = 20) -> Self:
        self.sink.start()
        self.queue.mkdir(mode=0o700)
        (self.base / "statistics").touch()
        (self.base / "service.switch").write_text("hosts files\naliases files\n")
        (self.base / "sendmail.mc").write_text(self.mc())
        with open(self.base / "sendmail.cf", "wb") as cf:
            done = subprocess.run(
                ["m4", str(self.base / "sendmail.mc")], stdout=cf, stderr=subprocess.PIPE
            )
        if done.returncode != 0 or done.stderr:
            raise SendmailError(f"m4 failed: {done.stderr.decode(errors='replace')}")
        with open(self.base / "sendmail.out", "wb") as out:
            self._process = subprocess.Popen(
                [
                    "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', HOSTNAME,
                    str(SENDMAIL), "-C", str(self.base / "sendmail.cf"), "-bD",
                ],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _listening(self.smtp_port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SendmailError(f"sendmail did not start: {self.log_text()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the daemon (by its PID), wait for it; the sink stops too."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout)
        self.sink.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "sendmail.out").read_text(errors="replace")
        return ""

    def delivered(self) -> list[DeliveredMessage]:
        return self.sink.delivered()

    def wait_for_delivery(self, count: int = 1, timeout: float = 20) -> list[DeliveredMessage]:
        """Wait until the sink holds ``count`` messages; returns them (raises on timeout)."""
        deadline = time.monotonic() + timeout
        while len(delivered := self.delivered()) < count:
            if time.monotonic() > deadline:
                raise SendmailError(f"{len(delivered)} of {count} messages delivered")
            time.sleep(0.05)
        return delivered

    def held_messages(self) -> list[str]:
        """The quarantine reasons of held (``hf*``) queue files (their ``q`` line)."""
        reasons = []
        for path in sorted(self.queue.glob("hf*")):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("q"):
                    reasons.append(line[1:])
        return reasons

    def wait_for_held(self, count: int = 1, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(held := self.held_messages()) < count:
            if time.monotonic() > deadline:
                raise SendmailError(f"{len(held)} of {count} messages held")
            time.sleep(0.05)
        return held

    def alive(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)
