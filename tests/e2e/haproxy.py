"""Postfix -> HAProxy -> several pymilterkit instances, all throwaway, on loopback only.

Theory of operation
-------------------
The topology of docs/guides/several-hosts.md, on one machine::

    smtplib clients --SMTP--> Postfix (127.0.0.1)   smtpd_milters = inet:127.0.0.1:FRONT
                                  |
                                  +--milter--> HAProxy (127.0.0.1:FRONT, mode tcp, leastconn)
                                                 |-> m1  pymilterkit run, inet:PORT@127.0.0.2
                                                 |-> m2  pymilterkit run, inet:PORT@127.0.0.3
                                                 '-> m3  pymilterkit run, inet:PORT@127.0.0.4
                  Postfix --LMTP--> `LmtpSink` (127.0.0.1, a thread of the test process)

Each instance has its own loopback address, standing for a host of its own (the same port on
each). HAProxy is Debian's ``haproxy``, started in the foreground (``-db``) from a configuration
written into a fresh directory, with its runtime API (``stats socket ... level admin``) there
too; `HAProxy.stats` reads ``show stat`` (per-server state, current and total sessions,
connection errors, redispatches) and `HAProxy.set_state` is ``set server B/S state ...``.
Health checks are either TCP connects (``health="tcp"``) or ``GET /healthz`` on each
instance's ``--metrics`` port (``health="http"``).

Delivered mail goes to `LmtpSink` instead of the pipe(8) sink of ``postfix.py``: that one
starts a Python interpreter per delivery (~10 ms of CPU), which for the thousands of messages of
a failover run would cost more than the milters; Postfix's ``lmtp`` client keeps a few
connections to the sink open and hands it each message with its envelope.

`Load` is the SMTP side: threads with `smtplib`, each sending its share of numbered messages
over SMTP sessions of a few messages each (one milter connection per SMTP session, as Postfix
opens them). A message whose reply is not 250 is recorded with its code, and its session is
ended (Postfix keeps a session whose milter failed in the failed state); the next message goes
over a new session. Nothing is retried unless the caller says so.

Only processes started here are signalled, by PID. Requires root (the Postfix master).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from pymilterkit.testing import MilterProcess

from .postfix import PostfixInstance, free_port

__all__ = [
    "FILTER",
    "Fleet",
    "HAProxy",
    "Instance",
    "LmtpSink",
    "Load",
    "Outcome",
    "SinkPostfix",
    "Topology",
    "haproxy_binary",
    "message_for",
    "port_free_on_all",
]

ROOT = Path(__file__).resolve().parents[2]
FILTER = "tests.e2e.haproxy_filters:HaproxyTagged"
RECIPIENTS = ("bob@example.com", "carol@example.org")
SENDER = "alice@example.net"
Health = Literal["tcp", "http"]


def haproxy_binary() -> str:
    """Path of Debian's haproxy (``.ci/bootstrap.sh`` installs it)."""
    found = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise FileNotFoundError("haproxy is not installed (apt-get install haproxy)")
    return found


def _wait(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    """Poll ``predicate()`` until true; raise TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(step)


# -- the delivery side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One message as Postfix's lmtp client handed it to the sink."""

    sender: str
    recipients: tuple[str, ...]
    raw: bytes

    def headers(self) -> Message:
        """The header section, parsed (cheap: the body is not parsed)."""
        return BytesHeaderParser(policy=compat32).parsebytes(self.raw)


class _LmtpHandler(socketserver.StreamRequestHandler):
    server: _LmtpServer

    def handle(self) -> None:
        out = self.wfile
        out.write(b"220 sink.pymilterkit.test LMTP\r\n")
        sender, recipients = "", list[str]()
        while line := self.rfile.readline(65536):
            verb = line[:4].upper()
            if verb == b"LHLO":
                out.write(b"250-sink.pymilterkit.test\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                sender, recipients = line[10:].strip().decode(errors="replace"), []
                out.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                recipients.append(line[8:].strip().decode(errors="replace"))
                out.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                out.write(b"354 go ahead\r\n")
                out.flush()
                chunks = []
                while (data := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                    chunks.append(data[1:] if data.startswith(b"..") else data)
                self.server.add(Delivery(sender.strip("<>"), tuple(
                    r.strip("<>") for r in recipients), b"".join(chunks)))
                out.write(b"250 2.0.0 delivered\r\n" * len(recipients))
                sender, recipients = "", []
            elif verb == b"QUIT":
                out.write(b"221 2.0.0 bye\r\n")
                return
            else:  # RSET, NOOP
                out.write(b"250 2.0.0 ok\r\n")
            out.flush()


class _LmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LmtpHandler)
        self.lock = threading.Lock()
        self.deliveries: list[Delivery] = []

    def add(self, delivery: Delivery) -> None:
        with self.lock:
            self.deliveries.append(delivery)


class LmtpSink:
    """A minimal LMTP server on 127.0.0.1 that keeps every message it is given, in memory."""

    def __init__(self) -> None:
        self._server = _LmtpServer()
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="lmtp-sink", daemon=True
        )

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()

    def deliveries(self) -> list[Delivery]:
        """Everything delivered so far (a copy)."""
        with self._server.lock:
            return list(self._server.deliveries)

    def wait_for(self, count: int, timeout: float = 60) -> list[Delivery]:
        """Wait until at least ``count`` messages are in; return all of them."""
        _wait(lambda: len(self._server.deliveries) >= count, timeout,
              f"{count} deliveries (have {len(self._server.deliveries)})", step=0.05)
        return self.deliveries()

    def clear(self) -> None:
        with self._server.lock:
            self._server.deliveries.clear()


class SinkPostfix(PostfixInstance):
    """The throwaway Postfix of ``postfix.py``, delivering everything over LMTP to a sink."""

    def __init__(self, smtpd_milters: str, sink_port: int, **extra: str) -> None:
        config = {
            "transport_maps": f"static:lmtp:[127.0.0.1]:{sink_port}",
            "lmtp_destination_recipient_limit": "1000",
            # Every message goes to the one sink: let qmgr use as many lmtp clients as smtpd
            # has clients, so delivery keeps up with the load.
            "lmtp_destination_concurrency_limit": "8",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_connection_count_limit": "0",
            **extra,
        }
        super().__init__(smtpd_milters, config)

    def master_cf(self) -> str:
        return super().master_cf() + "lmtp unix - - n - - lmtp\n"


# -- HAProxy --------------------------------------------------------------------------------


@dataclass
class Backend:
    """One server line of the HAProxy backend: a milter instance's address and check port."""

    name: str
    host: str
    port: int
    check_port: int | None = None  # the instance's --metrics port, for health="http"


class HAProxy:
    """Debian's haproxy in the foreground, in TCP mode, from a config in a fresh directory."""

    BACKEND = "milters"

    def __init__(
        self,
        servers: Sequence[Backend],
        *,
        health: Health = "tcp",
        check_inter_ms: int = 500,
        fall: int = 2,
        rise: int = 2,
        idle_timeout: str = "10m",
    ) -> None:
        self.servers = list(servers)
        self.idle_timeout = idle_timeout
        self.health = health
        self.check_inter_ms = check_inter_ms
        self.fall = fall
        self.rise = rise
        self.base = Path(tempfile.mkdtemp(prefix="pmk-hap-", dir="/tmp"))
        self.config_path = self.base / "haproxy.cfg"
        self.admin_socket = self.base / "admin.sock"
        self.log_path = self.base / "haproxy.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """The haproxy.cfg this instance runs (the guide's, with test addresses)."""
        check = f"check inter {self.check_inter_ms} fall {self.fall} rise {self.rise}"
        lines = [
            "global",
            "    log stdout format raw local0 info",
            f"    stats socket {self.admin_socket} mode 600 level admin",
            "    maxconn 4000",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    timeout connect 2s",
            # Longer than an SMTP session may sit idle (smtpd_timeout, 300 s by default): the
            # milter connection is idle as long as the SMTP client is.
            f"    timeout client {self.idle_timeout}",
            f"    timeout server {self.idle_timeout}",
            f"    timeout tunnel {self.idle_timeout}",
            "    timeout check 2s",
            "    retries 2",
            "    option redispatch 1",
            "",
            "frontend milter",
            f"    bind 127.0.0.1:{self.port}",
            f"    default_backend {self.BACKEND}",
            "",
            f"backend {self.BACKEND}",
            "    balance leastconn",
        ]
        if self.health == "http":
            lines += [
                "    option httpchk",
                "    http-check send meth GET uri /healthz",
                "    http-check expect status 200",
            ]
        for s in self.servers:
            port = f" port {s.check_port}" if self.health == "http" else ""
            lines.append(f"    server {s.name} {s.host}:{s.port} {check}{port}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15) -> Self:
        self.port = free_port()
        self.config_path.write_text(self.config())
        check = subprocess.run([haproxy_binary(), "-c", "-q", "-f", str(self.config_path)],
                               capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused the configuration:\n{check.stderr}")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n"
                                   f"{self.log_text()}")
            with contextlib.suppress(OSError):
                if self.admin_socket.exists() and self.runtime("show info"):
                    return self
            if time.monotonic() > deadline:
                text = self.log_text()
                self.cleanup()
                raise RuntimeError(f"haproxy did not start:\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Hard stop: SIGTERM to our PID (SIGKILL if it lingers)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            self.process = None

    def cleanup(self) -> None:
        """Stop, then remove the directory (config, runtime socket, log)."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- the runtime API ----------------------------------------------------------------------

    def runtime(self, command: str) -> str:
        """One command on the admin socket; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(self.admin_socket))
            conn.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers, by server name (HAProxy's CSV fields)."""
        text = self.runtime("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == self.BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def status(self, server: str) -> str:
        """``UP``, ``DOWN``, ``DRAIN``, ``MAINT``, ... (``UP 1/2`` while rising is ``UP``)."""
        return self.stats()[server]["status"].split(" ")[0]

    def wait_status(self, server: str, wanted: str, timeout: float = 20) -> float:
        """Wait until ``server`` is in state ``wanted``; return the seconds it took."""
        started = time.monotonic()
        _wait(lambda: self.status(server) == wanted, timeout,
              f"haproxy server {server} {wanted} (is {self.status(server)})", step=0.05)
        return time.monotonic() - started

    def set_state(self, server: str, state: Literal["ready", "drain", "maint"]) -> None:
        answer = self.runtime(f"set server {self.BACKEND}/{server} state {state}")
        if answer.strip():
            raise RuntimeError(f"set server {server} state {state}: {answer}")

    def current_sessions(self, server: str) -> int:
        return int(self.stats()[server]["scur"] or 0)

    def total_sessions(self) -> dict[str, int]:
        return {name: int(row["stot"] or 0) for name, row in self.stats().items()}


# -- the milter instances ---------------------------------------------------------------------


class Instance:
    """One ``pymilterkit run`` on its own loopback address ("host"); restartable."""

    def __init__(self, name: str, host: str, port: int, metrics_port: int | None,
                 args: Sequence[str] = (), target: str = FILTER) -> None:
        self.name = name
        self.target = target
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.args = list(args)
        self.process: MilterProcess | None = None
        self.logs: list[str] = []
        self.starts = 0

    def command_args(self) -> list[str]:
        args = ["--log-level", "INFO", *self.args]
        if self.metrics_port is not None:
            args += ["--metrics", f"{self.host}:{self.metrics_port}"]
        return args

    def start(self) -> Self:
        env = dict(os.environ, PMK_INSTANCE=self.name)
        self.process = MilterProcess(self.target, f"inet:{self.port}@{self.host}",
                                     args=self.command_args(), env=env, cwd=ROOT)
        self.process.start()
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, by PID: the host "dies"; its connections are reset."""
        assert self.process is not None
        self.process.signal(signal.SIGKILL)
        self.process.wait(10)
        self._forget()

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM (drains, where the runner does), wait; the exit status."""
        if self.process is None:
            return 0
        status = self.process.stop(timeout)
        self._forget()
        return status

    def _forget(self) -> None:
        assert self.process is not None
        self.logs.append(self.process.log())
        self.process.__exit__(None, None, None)
        self.process = None

    def log(self) -> str:
        current = self.process.log() if self.process is not None else ""
        return "\n".join([*self.logs, current])


class Fleet:
    """Three (or N) instances on 127.0.0.2, .3, ... with the same milter port each."""

    def __init__(self, count: int = 3, *, metrics: bool = False, args: Sequence[str] = ()):
        hosts = [f"127.0.0.{2 + i}" for i in range(count)]
        port = port_free_on_all(hosts)
        metrics_port = port_free_on_all(hosts, avoid=port) if metrics else None
        self.instances = [Instance(f"m{i + 1}", host, port, metrics_port, args)
                          for i, host in enumerate(hosts)]

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.instances)

    def __getitem__(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    def backends(self) -> list[Backend]:
        return [Backend(i.name, i.host, i.port, i.metrics_port) for i in self.instances]

    def start(self) -> Self:
        for instance in self.instances:
            instance.start()
        return self

    def stop(self) -> None:
        for instance in self.instances:
            with contextlib.suppress(Exception):
                instance.stop(10)


def port_free_on_all(hosts: Iterable[str], avoid: int = 0) -> int:
    """A TCP port that is free on each of ``hosts`` (loopback addresses)."""
    hosts = list(hosts)
    for _ in range(50):
        port = free_port(hosts[0])
        if port == avoid:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    probe = stack.enter_context(socket.socket())
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


# -- the SMTP side --------------------------------------------------------------------------


def message_for(key: str) -> bytes:
    """Message number ``key``: its Subject carries the key, so deliveries can be matched."""
    return (
        f"From: Alice <{SENDER}>\r\nTo: bob@example.com\r\nSubject: load {key}\r\n"
        f"Message-Id: <{key}@load.pymilterkit.test>\r\n"
        "Date: Thu, 03 Dec 2026 12:00:00 +0000\r\n\r\n"
        "Hello Bob, this is one message of many.\r\n"
    ).encode()


@dataclass(frozen=True)
class Outcome:
    """What the SMTP client got for one message."""

    key: str
    code: int  # 250: accepted; an SMTP code otherwise; 0: the connection failed
    reply: str
    session_opened: float  # time.monotonic() when its SMTP session was opened
    finished: float

    @property
    def accepted(self) -> bool:
        return self.code == 250


@dataclass
class Load:
    """Send ``count`` messages over ``concurrency`` SMTP clients, in a background thread each."""

    port: int
    count: int
    concurrency: int = 12
    per_session: int = 5
    prefix: str = "m"
    source: str = "127.0.0.1"  # the clients' address (Postfix accepts 127.0.0.0/8)
    outcomes: list[Outcome] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = 0.0
    finished: float = 0.0

    def __post_init__(self) -> None:
        self._numbers = iter(range(self.count))
        self._numbers_lock = threading.Lock()
        self._stopping = False

    def _next_key(self) -> str | None:
        with self._numbers_lock:
            number = None if self._stopping else next(self._numbers, None)
        return None if number is None else f"{self.prefix}{number:06d}"

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    @staticmethod
    def _send(smtp: smtplib.SMTP, key: str, opened: float) -> Outcome:
        try:
            refused = smtp.sendmail(SENDER, list(RECIPIENTS), message_for(key))
        except smtplib.SMTPRecipientsRefused as exc:  # every RCPT refused (not a response one)
            refused = exc.recipients
        except smtplib.SMTPResponseException as exc:
            error: bytes | str = exc.smtp_error
            reply = error.decode(errors="replace") if isinstance(error, bytes) else error
            return Outcome(key, exc.smtp_code, reply, opened, time.monotonic())
        if refused:
            code, text = next(iter(refused.values()))
            return Outcome(key, code, text.decode(errors="replace"), opened, time.monotonic())
        return Outcome(key, 250, "", opened, time.monotonic())

    def send_one(self, key: str) -> Outcome:
        """Send message ``key`` over an SMTP session of its own (e.g. a retry); not recorded."""
        opened = time.monotonic()
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60,
                              source_address=(self.source, 0)) as smtp:
                smtp.ehlo("client.example.net")
                return self._send(smtp, key, opened)
        except (OSError, smtplib.SMTPException) as exc:
            return Outcome(key, 0, repr(exc), opened, time.monotonic())

    def _client(self) -> None:
        key = self._next_key()
        while key is not None:
            opened = time.monotonic()
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=60,
                              source_address=(self.source, 0)) as smtp:
                    smtp.ehlo("client.example.net")
                    for _ in range(self.per_session):
                        outcome = self._send(smtp, key, opened)
                        self._record(outcome)
                        key = self._next_key()
                        if key is None or not outcome.accepted:
                            break  # a failed milter fails the rest of the session
            except (OSError, smtplib.SMTPException) as exc:
                if key is not None:
                    self._record(Outcome(key, 0, repr(exc), opened, time.monotonic()))
                    key = self._next_key()

    def start(self) -> Self:
        self.started = time.monotonic()
        self._threads = [threading.Thread(target=self._client, name=f"smtp-{n}", daemon=True)
                         for n in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Send no further message (those under way finish); `join` then returns soon."""
        with self._numbers_lock:
            self._stopping = True

    def done(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_done(self, count: int, timeout: float = 120) -> None:
        _wait(lambda: self.done() >= count, timeout, f"{count} messages sent", step=0.01)

    def join(self, timeout: float = 300) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise TimeoutError(f"SMTP clients still running after {timeout} s")
        self.finished = time.monotonic()
        return list(self.outcomes)

    def run(self, timeout: float = 300) -> list[Outcome]:
        return self.start().join(timeout)

    def rate(self) -> float:
        """Accepted messages per second over the whole load."""
        accepted = sum(o.accepted for o in self.outcomes)
        return accepted / max(1e-9, self.finished - self.started)


# -- all of it ------------------------------------------------------------------------------


class Topology:
    """Sink, fleet, HAProxy and Postfix, started in that order; a context manager."""

    def __init__(self, *, health: Health = "tcp", instances: int = 3,
                 milter_args: Sequence[str] = (), check_inter_ms: int = 500,
                 idle_timeout: str = "10m",
                 postfix_config: dict[str, str] | None = None) -> None:
        self.sink = LmtpSink()
        self.fleet = Fleet(instances, metrics=health == "http", args=milter_args)
        self.haproxy = HAProxy(self.fleet.backends(), health=health,
                               check_inter_ms=check_inter_ms, idle_timeout=idle_timeout)
        self.postfix: SinkPostfix | None = None
        self.postfix_config = dict(postfix_config or {})

    def start(self) -> Self:
        self.sink.start()
        self.fleet.start()
        self.haproxy.start()
        for instance in self.fleet:
            self.haproxy.wait_status(instance.name, "UP")
        self.postfix = SinkPostfix(f"inet:127.0.0.1:{self.haproxy.port}", self.sink.port,
                                   **self.postfix_config)
        self.postfix.start()
        return self

    @property
    def smtp_port(self) -> int:
        assert self.postfix is not None
        return self.postfix.smtp_port

    def stop(self) -> None:
        if self.postfix is not None:
            self.postfix.cleanup()
        self.haproxy.cleanup()
        self.fleet.stop()
        self.sink.stop()

    def postfix_log(self) -> str:
        return self.postfix.log_text() if self.postfix is not None else ""

    def wait_postfix_log(self, text: str, timeout: float = 15) -> None:
        """Wait until Postfix has logged `text` (its log lines are written after the SMTP
        reply that they explain may already have reached the client)."""
        _wait(lambda: text in self.postfix_log(), timeout, f"postfix logging {text!r}", 0.05)

    def logs(self) -> str:
        """Everything worth reading after a failure."""
        parts = [f"--- haproxy ---\n{self.haproxy.log_text()[-20000:]}"]
        for instance in self.fleet:
            parts.append(f"--- {instance.name} ---\n{instance.log()[-5000:]}")
        if self.postfix is not None:
            parts.append(f"--- postfix ---\n{self.postfix.log_text()[-20000:]}")
        return "\n".join(parts)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- the scenarios (shared by tests/e2e/test_haproxy.py and benchmarks/haproxy_fleet.py) ----------


UNLIMITED = 10**7  # a Load's count when it runs until `Load.stop`


def _key(delivery: Delivery) -> str:
    return str(delivery.headers()["Subject"]).removeprefix("load ")


def check_deliveries(outcomes: Sequence[Outcome], sink: LmtpSink,
                     timeout: float = 60) -> dict[str, str]:
    """Wait for every accepted message; return ``{key: X-Served-By}`` of the deliveries.

    Only deliveries of the loads that sent ``outcomes`` are looked at (same key prefixes).
    Raises AssertionError if one is missing, unexpected, duplicated, or lacks the filter's
    modification (``X-Rcpt-Count: 2``, one ``X-Served-By``).
    """
    accepted = {o.key for o in outcomes if o.accepted}
    prefixes = tuple({o.key.rstrip("0123456789") for o in outcomes})

    def ours() -> list[Delivery]:
        return [d for d in sink.deliveries() if _key(d).startswith(prefixes)]

    _wait(lambda: len(ours()) >= len(accepted), timeout,
          f"{len(accepted)} deliveries (have {len(ours())})", step=0.1)
    served: dict[str, str] = {}
    for delivery in ours():
        headers = delivery.headers()
        key = _key(delivery)
        assert key not in served, f"{key} delivered twice"
        assert headers.get_all("X-Rcpt-Count") == ["2"], (key, headers.items())
        [served[key]] = headers.get_all("X-Served-By") or ["(none)"]
        assert sorted(delivery.recipients) == sorted(RECIPIENTS), (key, delivery.recipients)
    assert set(served) == accepted, (
        f"missing {sorted(accepted - set(served))[:10]}, unexpected "
        f"{sorted(set(served) - accepted)[:10]}")
    return served


@dataclass
class FailoverReport:
    """What happened when one instance was SIGKILLed under load, and restarted."""

    victim: str
    outcomes: list[Outcome]
    in_flight_at_kill: int  # HAProxy's current sessions on the victim just before the kill
    seconds_to_down: float  # from the kill until HAProxy's check took it out
    check_status: str  # HAProxy's check_status once it was DOWN (L4CON: connection refused)
    redispatched: int  # connections HAProxy sent elsewhere after failing to reach the victim
    seconds_to_up: float  # from the restart until HAProxy had it UP again
    served: dict[str, str]  # key -> instance, of every delivered message
    after_rejoin: set[str]  # keys sent in SMTP sessions opened after it was UP again
    killed_at: float
    failed_later: list[Outcome] = field(default_factory=list)  # failures in later sessions

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.accepted]

    def summary(self) -> dict[str, object]:
        per_instance: dict[str, int] = {}
        for instance in self.served.values():
            per_instance[instance] = per_instance.get(instance, 0) + 1
        return {
            "victim": self.victim,
            "sent": len(self.outcomes),
            "accepted": len(self.outcomes) - len(self.failures),
            "tempfailed": sum(o.code == 451 for o in self.failures),
            "other_failures": sum(o.code != 451 for o in self.failures),
            "failure_replies": dict(Counter(f"{o.code} {o.reply}" for o in self.failures)),
            "failed_in_sessions_opened_after_the_kill": len(self.failed_later),
            "in_flight_at_kill": self.in_flight_at_kill,
            "seconds_to_down": round(self.seconds_to_down, 3),
            "check_status": self.check_status,
            "redispatched": self.redispatched,
            "seconds_to_up": round(self.seconds_to_up, 3),
            "delivered": len(self.served),
            "delivered_per_instance": dict(sorted(per_instance.items())),
            "served_by_victim_after_rejoin": sum(
                self.served.get(k) == self.victim for k in self.after_rejoin),
        }


def failover(topo: Topology, victim: str = "m2", *, before: int = 800, after: int = 800,
             concurrency: int = 12, per_session: int = 5) -> FailoverReport:
    """``before`` messages, SIGKILL ``victim`` (with sessions on it), wait until HAProxy has it
    DOWN, ``after`` more messages, restart it, and go on until it has served a few sessions."""
    hp, instance = topo.haproxy, topo.fleet[victim]
    load = Load(topo.smtp_port, UNLIMITED, concurrency, per_session, prefix="f").start()
    try:
        load.wait_done(before)
        _wait(lambda: hp.current_sessions(victim) >= 2, 30, f"sessions on {victim}", 0.001)
        in_flight = hp.current_sessions(victim)
        redispatched = int(hp.stats()[victim]["wredis"] or 0)
        kill_sent = time.monotonic()
        instance.kill()
        # Sessions opened until its death was complete may still have reached its listening
        # queue (the kernel accepts for a process being killed); from here HAProxy gets
        # "connection refused" and redispatches.
        killed_at = time.monotonic()
        hp.wait_status(victim, "DOWN", timeout=30)
        seconds_to_down = time.monotonic() - kill_sent
        check_status = hp.stats()[victim]["check_status"]
        load.wait_done(load.done() + after)
        restarted_at = time.monotonic()
        instance.start()
        hp.wait_status(victim, "UP", timeout=30)
        up_at = time.monotonic()
        seconds_to_up = up_at - restarted_at
        sessions = hp.total_sessions()[victim]
        _wait(lambda: hp.total_sessions()[victim] >= sessions + 3, 60,
              f"{victim} serving again")
        redispatched = int(hp.stats()[victim]["wredis"] or 0) - redispatched
    finally:
        load.stop()
        outcomes = load.join()
    served = check_deliveries(outcomes, topo.sink)
    return FailoverReport(
        victim=victim, outcomes=outcomes, in_flight_at_kill=in_flight,
        seconds_to_down=seconds_to_down, check_status=check_status,
        redispatched=redispatched, seconds_to_up=seconds_to_up, served=served,
        after_rejoin={o.key for o in outcomes if o.session_opened > up_at},
        killed_at=killed_at,
        failed_later=[o for o in outcomes if not o.accepted and o.session_opened > killed_at],
    )


Drain = Literal["runtime-api", "sigterm"]


@dataclass
class RestartStep:
    """One instance's turn in a rolling restart."""

    instance: str
    seconds_draining: float  # from the drain request until its last session ended / it exited
    exit_status: int
    seconds_to_up: float  # from the restart until HAProxy had it UP (and ready) again
    served_after: int  # HAProxy sessions it had taken when the next step began


@dataclass
class RollingReport:
    via: Drain
    outcomes: list[Outcome]
    steps: list[RestartStep]
    served: dict[str, str]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.accepted]

    def summary(self) -> dict[str, object]:
        return {
            "drain": self.via,
            "sent": len(self.outcomes),
            "accepted": len(self.outcomes) - len(self.failures),
            "failed": len(self.failures),
            "delivered": len(self.served),
            "steps": [vars(step) | {"seconds_draining": round(step.seconds_draining, 3),
                                    "seconds_to_up": round(step.seconds_to_up, 3)}
                      for step in self.steps],
        }


def rolling_restart(topo: Topology, via: Drain = "runtime-api", *, warm: int = 300,
                    settle: int = 300, concurrency: int = 12, per_session: int = 5,
                    stop_timeout: float = 40) -> RollingReport:
    """Under load, for each instance in turn: drain it, stop it (SIGTERM), start it again,
    and wait until HAProxy has it UP and it has served a few sessions.

    ``via="runtime-api"``: HAProxy's ``set server ... state drain`` (no new connections), then
    wait until HAProxy counts no session on it, then SIGTERM; ``state ready`` once it is back.
    ``via="sigterm"``: only SIGTERM; the runner drains (``/healthz`` answers 503, HAProxy's check
    takes it out, sessions in flight finish) and exits.
    """
    steps: list[RestartStep] = []
    load = Load(topo.smtp_port, UNLIMITED, concurrency, per_session, prefix="r").start()
    try:
        load.wait_done(warm)
        for instance in topo.fleet:
            steps.append(_restart_one(topo, instance, via, stop_timeout))
        load.wait_done(load.done() + settle)
    finally:
        load.stop()
        outcomes = load.join()
    served = check_deliveries(outcomes, topo.sink)
    return RollingReport(via, outcomes, steps, served)


def _restart_one(topo: Topology, instance: Instance, via: Drain,
                 stop_timeout: float) -> RestartStep:
    hp, name = topo.haproxy, instance.name
    began = time.monotonic()
    if via == "runtime-api":
        hp.set_state(name, "drain")
        _wait(lambda: hp.current_sessions(name) == 0, stop_timeout, f"{name} drained", 0.01)
    status = instance.stop(stop_timeout)
    drained = time.monotonic() - began
    if via == "sigterm":
        # HAProxy takes it out on its own check (fall x inter) before the new one starts. Started
        # at once, the new process may meet a server HAProxy never marked DOWN; HAProxy 3.2
        # (Debian testing) then never sends it a connection again, though it shows it UP.
        hp.wait_status(name, "DOWN", timeout=30)
    restarted = time.monotonic()
    instance.start()
    if via == "runtime-api":
        # Back in service once HAProxy's check reaches the new process.
        _wait(lambda: hp.stats()[name]["check_status"] in ("L4OK", "L7OK")
              and hp.status(name) != "DOWN", 30, f"{name} checked", 0.05)
        hp.set_state(name, "ready")
    hp.wait_status(name, "UP", timeout=30)
    to_up = time.monotonic() - restarted
    sessions = hp.total_sessions()[name]
    _wait(lambda: hp.total_sessions()[name] >= sessions + 3, 60, f"{name} serving again")
    return RestartStep(name, drained, status, to_up, hp.total_sessions()[name] - sessions)
