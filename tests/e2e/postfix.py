"""A throwaway, private Postfix instance for end-to-end tests.

Theory of operation
-------------------
`PostfixInstance` builds a complete Postfix instance from scratch in a fresh directory
(``/tmp/pmk-pf-XXXXXXXX`` by default, short and reachable by the ``postfix`` and ``nobody``
users; pytest's own ``tmp_path`` lives under a 0700 directory that they cannot traverse)::

    BASE/
      etc/      main.cf and master.cf, written here (``postfix -c BASE/etc``)
      queue/    queue_directory, owned and populated by Postfix itself
      data/     data_directory
      sink/     one ``N.eml`` + ``N.json`` pair per delivery (written by sink.py)
      sink.py   the pipe(8) command that writes the sink
      maillog   every log line of this instance (``maillog_file`` + the postlog service)

The instance listens with ``smtpd`` on ``127.0.0.1:<free port>`` (``smtp_port``). Mail for
``@example.com`` and ``@example.org`` is accepted from 127.0.0.1; every other destination is
refused with "Relay access denied". Everything that gets queued -- including any bounce -- is
delivered through a ``pipe(8)`` service to the sink, so nothing ever leaves the machine. One
delivery normally carries all recipients of a message. The stored bytes are what Postfix hands to
a pipe command: LF line endings, with the headers that Postfix added (``Received:``,
``Message-Id:`` / ``Date:`` if missing, and whatever a milter changed).

Every service in master.cf runs with ``chroot = n``; the master runs as root (it must), the
daemons as ``postfix``, the sink as ``nobody``. Only processes that this class started are ever
signalled: the master by the PID in its pid file, and after that any straggler whose environment
carries ``MAIL_CONFIG=<this instance's etc dir>``.

Requires root (Postfix's master must start as root).
"""

from __future__ import annotations

import contextlib
import email.policy
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import Self, cast

__all__ = [
    "DeliveredMessage",
    "PostfixError",
    "PostfixFactory",
    "PostfixInstance",
    "grant_postfix_access",
    "make_socket_dir",
]

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/postfix"
POSTCAT = shutil.which("postcat", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/postcat"
POSTQUEUE = shutil.which("postqueue", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/postqueue"
SINK_USER = "nobody"
MAIL_OWNER = "postfix"

_SINK_SCRIPT = '''\
"""pipe(8) command of a pymilterkit test Postfix: argv = SINK_DIR SENDER QUEUE_ID RCPT..."""
import json, os, sys, time

sink, sender, queue_id, *recipients = sys.argv[1:]
data = sys.stdin.buffer.read()
stem = "%020d-%d" % (time.time_ns(), os.getpid())
for suffix, payload in (
    (".eml", data),
    (".json", json.dumps(
        {"sender": sender, "recipients": recipients, "queue_id": queue_id}
    ).encode()),
):
    tmp = os.path.join(sink, "." + stem + suffix)
    with open(tmp, "wb") as f:
        f.write(payload)
    os.rename(tmp, os.path.join(sink, stem + suffix))   # .json last: marks the pair complete
'''


class PostfixError(RuntimeError):
    """The test Postfix could not be set up, started or stopped, or did not deliver in time."""


@dataclass(frozen=True)
class DeliveredMessage:
    """One delivery to the sink: the envelope as Postfix delivered it, and the message bytes."""

    sender: str
    """Envelope sender ("" for the null sender ``<>``)."""
    recipients: tuple[str, ...]
    """Envelope recipients of this delivery, in Postfix's order."""
    raw: bytes
    """The message exactly as Postfix delivered it (LF line endings)."""
    queue_id: str
    message: EmailMessage = field(repr=False, compare=False)
    """``raw`` parsed with ``email.policy.default``."""

    @classmethod
    def from_sink(cls, json_path: Path) -> DeliveredMessage:
        meta = json.loads(json_path.read_text())
        raw = json_path.with_suffix(".eml").read_bytes()
        message = BytesParser(policy=email.policy.default).parsebytes(raw)
        return cls(
            sender=str(meta["sender"]),
            recipients=tuple(str(r) for r in meta["recipients"]),
            raw=raw,
            queue_id=str(meta["queue_id"]),
            message=message,
        )


def _ids(user: str) -> tuple[int, int]:
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def make_socket_dir(tmp_path: Path) -> Path:
    """Create a directory for ``unix:`` milter sockets that Postfix's smtpd can reach.

    smtpd runs as the ``postfix`` user and connects to the socket by its absolute path, so every
    parent must be traversable by that user and the path must fit in ``sun_path`` (107 bytes).
    pytest's ``tmp_path`` fails on both counts (it lives under a 0700 ``/tmp/pytest-of-root``),
    so the directory is created as ``/tmp/pmk-sock-XXXXXXXX`` (mode 0o777) instead, and a symlink
    ``tmp_path / "milter-sockets"`` points to it. The caller removes it (``shutil.rmtree``); the
    ``milter_socket_dir`` fixture does that for you.

    The socket itself is created by the milter process with its umask; if that is 022 the
    ``postfix`` user cannot connect -- call `grant_postfix_access` on the socket once it exists,
    or start the milter with ``umask 0o000``.
    """
    path = Path(tempfile.mkdtemp(prefix="pmk-sock-", dir="/tmp"))
    path.chmod(0o777)
    link = tmp_path / "milter-sockets"
    with contextlib.suppress(OSError):
        link.symlink_to(path, target_is_directory=True)
    return path


def grant_postfix_access(path: Path) -> None:
    """Give the ``postfix`` user access to ``path`` (a milter socket): chown it to postfix."""
    uid, gid = _ids(MAIL_OWNER)
    os.chown(path, uid, gid)
    path.chmod(0o770 if path.is_dir() else 0o660)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (our PID 1 may never reap the master)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # Field 3, after the parenthesised command name (which may itself contain spaces/parens).
    state = status.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _processes_with_env(name: str, value: str) -> list[int]:
    """PIDs whose environment has exactly ``name=value`` (Postfix exports MAIL_CONFIG)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _listening(port: int) -> bool:
    """True if something listens on 127.0.0.1:port (read /proc: connecting would start smtpd,
    and smtpd would immediately talk to the milter under test)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return True
    return False


class PostfixInstance:
    """A private Postfix (own config, queue, port, log, sink); a context manager.

    Example::

        with PostfixInstance("inet:127.0.0.1:12345") as pf:
            with smtplib.SMTP("127.0.0.1", pf.smtp_port) as smtp:
                smtp.sendmail("a@example.net", ["b@example.com"], msg_bytes)
            [delivered] = pf.wait_for_delivery(1)
    """

    def __init__(
        self,
        smtpd_milters: str = "",
        extra_config: Mapping[str, str] | None = None,
        *,
        parent_dir: Path | str = "/tmp",
        keep: bool = False,
    ) -> None:
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root (its master starts as root)")
        self.smtpd_milters = smtpd_milters
        self.extra_config = dict(extra_config or {})
        self.keep = keep
        self.base = Path(tempfile.mkdtemp(prefix="pmk-pf-", dir=parent_dir))
        self.base.chmod(0o755)
        self.config_dir = self.base / "etc"
        self.queue_dir = self.base / "queue"
        self.data_dir = self.base / "data"
        self.sink_dir = self.base / "sink"
        self.log_path = self.base / "maillog"
        self.syslog_name = f"postfix-{self.base.name}"
        self.smtp_port = 0
        self._master_pid: int | None = None
        self._started = False

    # -- configuration -------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings this instance is started with (``extra_config`` applied last)."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": "postdrop",
            "syslog_name": self.syslog_name,
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.base),
            "myhostname": "mta.pymilterkit.test",
            "mydomain": "pymilterkit.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "example.com, example.org",
            "relay_recipient_maps": "",
            # Everything queued (incl. bounces) goes to the sink; nothing leaves the machine.
            "transport_maps": "static:sink:sink",
            "default_transport": "error:no external delivery",
            "sink_destination_recipient_limit": "1000",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_banner": "$myhostname ESMTP pymilterkit-test",
            "smtpd_error_sleep_time": "0s",
            "in_flow_delay": "0s",
            "biff": "no",
            "append_dot_mydomain": "no",
            "delay_warning_time": "0h",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "queue_run_delay": "1s",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
            "smtpd_milters": self.smtpd_milters,
            "non_smtpd_milters": "",
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
            "milter_connect_timeout": "10s",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "30s",
        }
        settings.update(self.extra_config)
        return settings

    def master_cf(self) -> str:
        # The sink runs as nobody: use the system interpreter, not one under /root (0700).
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        rows = [
            # service     type       private unpriv chroot wakeup maxproc command
            f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
            f"sink unix - n n - - pipe flags= user={SINK_USER} null_sender=\n"
            f"  argv={python} -I -S {self.base}/sink.py {self.sink_dir}"
            " ${sender} ${queue_id} ${recipient}",
        ]
        return "\n".join(rows) + "\n"

    def _write_config(self) -> None:
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, *_ids(MAIL_OWNER))  # master.lock is created as mail_owner
        self.sink_dir.mkdir(exist_ok=True)
        uid, gid = _ids(SINK_USER)
        os.chown(self.sink_dir, uid, gid)
        self.sink_dir.chmod(0o755)
        (self.base / "sink.py").write_text(_SINK_SCRIPT)
        (self.base / "sink.py").chmod(0o644)
        lines = [f"{key} = {value}" for key, value in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf())
        # Postfix sleeps in 300 ms steps until a table file is more than a second old (it
        # might still be being edited); backdating the files saves ~2 s per start.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    # -- lifecycle -----------------------------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        """Run ``postfix -c DIR ARGS``; return its exit status and what it printed.

        Postfix prints its diagnostics only to a terminal (otherwise to syslog, which may not
        exist, and errors found before logging is set up never reach ``maillog_file``), so
        stdout and stderr are a pseudo-terminal that we read.
        """
        leader, follower = os.openpty()
        try:
            with subprocess.Popen(
                [POSTFIX, "-c", str(self.config_dir), *args],
                stdin=subprocess.DEVNULL,
                stdout=follower,
                stderr=follower,
            ) as process:
                os.close(follower)
                follower = -1
                status = process.wait(timeout)
            output = b""
            # The daemonised master may keep the terminal open: read only what is there.
            while select.select([leader], [], [], 0.05)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(leader)
            if follower >= 0:
                os.close(follower)
        return status, output.decode(errors="replace").replace("\r\n", "\n")

    def start(self) -> Self:
        """Write the configuration and start the instance; return once smtpd is listening."""
        if self._started:
            return self
        last_error = ""
        for _attempt in range(5):
            self.smtp_port = free_port()
            self._write_config()
            status, last_error = self._postfix("start")
            if status == 0:
                self._started = True
                break
            # Someone else took our port between the probe and master's bind: try another one.
            if "Address already in use" not in last_error + self.log_text():
                break
            self._reap_master()
        if not self._started:
            raise PostfixError(
                f"postfix start failed:\n{last_error}\n--- maillog ---\n{self.log_text()}"
            )
        self._master_pid = self._read_master_pid()
        deadline = time.monotonic() + 10
        while not _listening(self.smtp_port):
            if time.monotonic() > deadline:
                self.stop()
                raise PostfixError(
                    f"Postfix did not listen on 127.0.0.1:{self.smtp_port}\n{self.log_text()}"
                )
            time.sleep(0.02)
        return self

    def _read_master_pid(self) -> int | None:
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text().strip())
            time.sleep(0.02)
        return None

    @property
    def master_pid(self) -> int | None:
        """PID of this instance's master process (None before start)."""
        return self._master_pid

    def is_running(self) -> bool:
        """True while our master process is alive."""
        return self._master_pid is not None and _pid_alive(self._master_pid)

    def processes(self) -> list[int]:
        """PIDs of this instance's live processes (master and daemons)."""
        found = _processes_with_env("MAIL_CONFIG", str(self.config_dir))
        return [pid for pid in found if _pid_alive(pid)]

    def stop(self, timeout: float = 15) -> None:
        """``postfix stop``, then make sure our master and its children are gone (by PID)."""
        if not self._started:
            return
        self._started = False
        if self._master_pid is None:
            self._master_pid = self._read_master_pid()
        self._postfix("stop", timeout=timeout)
        self._reap_master(timeout)

    def _reap_master(self, timeout: float = 15) -> None:
        pid = self._master_pid
        deadline = time.monotonic() + timeout
        if pid is not None:
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Daemons notice the master is gone and exit by themselves; anything left is ours
        # (its environment names our private config directory), so it may be ended by PID.
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop, then remove the instance directory (unless ``keep``)."""
        self.stop()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()  # the error message already carries the maillog
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- observation ---------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything this instance logged so far (its ``maillog_file``)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def delivered(self) -> list[DeliveredMessage]:
        """All deliveries to the sink so far, oldest first (does not wait)."""
        return [DeliveredMessage.from_sink(p) for p in sorted(self.sink_dir.glob("[0-9]*.json"))]

    def wait_for_delivery(self, count: int = 1, timeout: float = 20) -> list[DeliveredMessage]:
        """Wait until at least ``count`` deliveries are in the sink; return all of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.delivered()
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"expected {count} deliveries within {timeout}s, got {len(found)}\n"
                    f"--- maillog ---\n{self.log_text()}"
                )
            time.sleep(0.05)

    def clear_sink(self) -> None:
        """Forget all deliveries so far."""
        for p in self.sink_dir.iterdir():
            p.unlink(missing_ok=True)

    def held_messages(self) -> list[str]:
        """Queue IDs of the messages in the hold queue (what a milter's quarantine does)."""
        hold = self.queue_dir / "hold"
        if not hold.is_dir():
            return []
        return sorted(p.name for p in hold.rglob("*") if p.is_file())

    def wait_for_held(self, count: int = 1, timeout: float = 10) -> list[str]:
        """Wait until at least ``count`` messages are on hold; return their queue IDs."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.held_messages()
            if len(held) >= count or time.monotonic() > deadline:
                if len(held) < count:
                    raise PostfixError(
                        f"expected {count} held messages, got {held}\n{self.log_text()}"
                    )
                return held

            time.sleep(0.05)

    def postcat(self, queue_id: str) -> str:
        """``postcat -q ID``: the queue file (envelope records, headers, body) as text."""
        result = subprocess.run(
            [POSTCAT, "-c", str(self.config_dir), "-q", queue_id],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise PostfixError(f"postcat -q {queue_id} failed: {result.stderr}")
        return result.stdout

    def queued_ids(self, count: int, timeout: float = 15.0, settle: float = 3.0) -> list[str]:
        """Queue ids of the ``count`` queued messages, once no queue but the deferred one holds
        any, or ``settle`` seconds after all ``count`` are queued somewhere (a message moving
        between queues while ``postqueue`` walks them is listed twice, once per queue; qmgr
        has been seen to leave one in incoming for over 15 s under load, which is Postfix's
        business, not the milter's: the message was accepted and queued)."""
        deadline = time.monotonic() + timeout
        complete_since: float | None = None
        while True:
            entries = self.queue_json()
            ids = {str(entry["queue_id"]) for entry in entries}
            settled = all(entry["queue_name"] == "deferred" for entry in entries)
            now = time.monotonic()
            if len(ids) != count:
                complete_since = None
            elif complete_since is None:
                complete_since = now
            if complete_since is not None and (settled or now - complete_since >= settle):
                return sorted(ids)
            if now > deadline:
                raise PostfixError(
                    f"expected {count} queued messages, got {entries}\n{self.log_text()}"
                )
            time.sleep(0.05)

    def queue_json(self) -> list[dict[str, object]]:
        """``postqueue -j``: one dict per queued message (any queue: active, deferred, hold...)."""
        result = subprocess.run(
            [POSTQUEUE, "-c", str(self.config_dir), "-j"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise PostfixError(f"postqueue -j failed: {result.stderr}")
        return [
            cast(dict[str, object], json.loads(line))
            for line in result.stdout.splitlines()
            if line.strip()
        ]


PostfixFactory = Callable[..., PostfixInstance]
"""Type of the ``postfix_factory`` fixture: ``make(smtpd_milters="", extra_config=None)``
returning a started instance."""
