"""Hostile peers and misbehaving filters on the real libmilter (issue 19, items 2 and 3).

- A stage method raising a BaseException that is not KeyboardInterrupt/SystemExit
  (asyncio.CancelledError, GeneratorExit, a custom subclass) is answered with the error status
  and the milter goes on, with pre-forked workers too.
- A macro packet with an odd number of strings, then a connect whose on_connect calls
  `macro()` for an absent name, made libmilter's smfi_getsymval walk past the list's end and
  segfault; an unknown command without its NUL reached on_unknown with bytes past the packet.
  Both are sent over a raw socket, thousands of times, while a good client checks its answers.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from pymilterkit import InetAddress, Status, UnixAddress
from pymilterkit.testing import HeaderAdded, MilterClient, MilterProcess, Step
from pymilterkit.testing import _wire as w
from tests.helpers import worker_pids

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

ODD_MACROS = b"Cj\0v\0k\0"  # stage CONNECT, three strings: j=v and a name without a value
UNTERMINATED_UNKNOWN = b"ABC"  # no NUL
HOSTILE_CONNECTIONS = 5000
SENDERS = 4


def start(target: str, *args: str) -> MilterProcess:
    return MilterProcess(f"tests.integration.hostile_filters:{target}", args=args, cwd=ROOT)


def headers(mods: tuple[object, ...]) -> dict[str, str]:
    return {m.name: m.value for m in mods if isinstance(m, HeaderAdded)}


# -- item 2: BaseExceptions that are not fatal -----------------------------------------------


def test_stray_base_exceptions_are_answered_and_workers_survive() -> None:
    faulty = MilterProcess("tests.integration.filters:Faulty", args=["--workers", "2"], cwd=ROOT)
    with faulty as milter:
        workers = worker_pids(milter.pid, 2)
        for _ in range(4):  # connections spread over both workers
            conn = MilterClient(milter.socket, timeout=10).open()
            conn.negotiate()
            conn.connect("client.example.net", InetAddress(IPv4Address("192.0.2.1"), 25))
            conn.mail("<a@example.org>")
            for n in range(12):
                local = ("cancelled", "genexit", "custom")[n % 3]
                answer = conn.rcpt(f"<{local}@example.com>")
                assert answer is not None and answer.status is Status.TEMPFAIL, (n, answer)
            good = conn.rcpt("<good@example.com>")
            assert good is not None and good.status is Status.CONTINUE
            eom = conn.eom()
            assert eom.status is Status.CONTINUE
            assert headers(eom.modifications) == {"X-Served": "yes"}
            conn.quit()
        # The next good message is served normally, by the same workers.
        result = MilterClient(milter.socket, timeout=10).run(
            b"Subject: x\r\n\r\nbody\r\n", recipients=["good@example.com"]
        )
        assert result.status is Status.CONTINUE
        assert worker_pids(milter.pid, 2) == workers
        assert milter.process is not None and milter.process.poll() is None
        log = milter.log()
    for kind in ("CancelledError", "GeneratorExit", "Custom"):
        assert f"Faulty.on_rcpt raised {kind}; answering TEMPFAIL" in log
    assert "Traceback" in log
    assert "stopping the milter" not in log
    assert "giving up" not in log


# -- item 3: odd macro lists and unterminated unknown commands -------------------------------


class RawConnection:
    """A hand-driven MTA side: exactly the packets given, nothing filled in."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = w.PacketReader()

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(w.encode_packet(cmd, data))

    def receive(self) -> w.Packet:
        while True:
            packet = self.reader.next_packet()
            if packet is not None:
                return packet
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the milter closed the connection")
            self.reader.feed(chunk)

    def answer(self) -> tuple[bytes, list[w.Packet]]:
        """Packets up to the final answer of one command: (answer letter, modifications)."""
        mods = []
        while True:
            cmd, data = self.receive()
            if cmd in (w.ADDHEADER, w.PROGRESS):
                mods.append((cmd, data))
                continue
            return cmd, mods

    def negotiate(self) -> None:
        self.send(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
        cmd, _ = self.receive()
        assert cmd == b"O"

    def hostile_start(self) -> None:
        """Odd macro list, a connect that looks macros up, an unterminated unknown command."""
        self.negotiate()
        self.send(b"D", ODD_MACROS)
        self.send(b"C", w.encode_connect(b"hostile", UnixAddress("/x")))
        assert self.answer()[0] == w.CONTINUE
        self.send(b"U", UNTERMINATED_UNKNOWN)
        # CONTINUE: on_unknown got exactly "ABC"; REJECT: bytes past the packet came along.
        assert self.answer()[0] == w.CONTINUE

    def close(self) -> None:
        self.sock.close()


def test_odd_macro_list_and_unterminated_unknown_are_read_within_the_packet() -> None:
    with start("MacroProbe") as milter:
        raw = RawConnection(milter.spec.path)
        raw.hostile_start()
        raw.send(b"M", b"<a@example.org>\0")
        assert raw.answer()[0] == w.CONTINUE
        raw.send(b"R", b"<b@example.com>\0")
        assert raw.answer()[0] == w.CONTINUE
        raw.send(b"E")
        cmd, mods = raw.answer()
        raw.close()
        assert cmd == w.CONTINUE
        added: dict[str, str] = {}
        for _, data in mods:
            name, value = data.rstrip(b"\0").split(b"\0", 1)
            added[name.decode()] = value.decode()
        # j has the value v; k is the odd one out (no value); v is a value, not a name.
        assert added == {
            "X-Macro-absent": "None",
            "X-Macro-j": "'v'",
            "X-Macro-k": "None",
            "X-Macro-v": "None",
            "X-Macro-x": "None",
            "X-Unknown": "['ABC']",
        }


def good_message(path: str) -> dict[str, str]:
    conn = MilterClient(f"unix:{path}", timeout=10).open()
    conn.negotiate()
    conn.macros(Step.CONNECT, {"j": "mx.example.org", "{daemon_name}": "smtpd"})
    conn.connect("client.example.net", InetAddress(IPv4Address("192.0.2.7"), 4567))
    unknown = conn.unknown("XFOO bar")
    assert unknown is not None and unknown.status is Status.REJECT  # not "ABC": the probe's tell
    conn.mail("<a@example.org>")
    conn.rcpt("<b@example.com>")
    eom = conn.eom()
    conn.quit()
    assert eom.status is Status.CONTINUE
    return headers(eom.modifications)


class Senders:
    """`SENDERS` threads calling `work()` `total` times in all, until the first failure."""

    def __init__(self, total: int, work: Callable[[], object]) -> None:
        self.work, self.counter, self.lock = work, iter(range(total)), threading.Lock()
        self.results: list[object] = []
        self.failures: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(SENDERS)]
        for thread in self.threads:
            thread.start()

    def failed(self, exc: BaseException) -> None:
        with self.lock:
            self.failures.append(exc)

    def _run(self) -> None:
        while True:
            with self.lock:
                if next(self.counter, None) is None or self.failures:
                    return
            try:
                result = self.work()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.failed(exc)
                return
            with self.lock:
                self.results.append(result)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(180)


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers-2"])
def test_milter_serves_after_thousands_of_hostile_connections(workers: int) -> None:
    expected = {
        "X-Macro-absent": "None",
        "X-Macro-j": "'mx.example.org'",
        "X-Macro-k": "None",
        "X-Macro-v": "None",
        "X-Macro-x": "None",
        "X-Unknown": "['XFOO bar']",
    }
    args = ("--workers", str(workers)) if workers else ()
    with start("MacroProbe", *args) as milter:
        path = milter.spec.path
        pids = worker_pids(milter.pid, workers) if workers else []
        good: list[dict[str, str]] = []

        def hostile() -> None:
            raw = RawConnection(path)
            try:
                raw.hostile_start()
            finally:
                raw.close()

        senders = Senders(HOSTILE_CONNECTIONS, hostile)

        def good_client() -> None:
            while any(t.is_alive() for t in senders.threads):
                try:
                    good.append(good_message(path))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    senders.failed(exc)
                    return

        checker = threading.Thread(target=good_client)
        checker.start()
        senders.join()
        checker.join(30)
        failures = senders.failures
        assert not failures, f"{failures[:3]!r}\n{milter.log()[-3000:]}"
        assert milter.process is not None and milter.process.poll() is None
        assert good and all(h == expected for h in good), good[:3]
        assert good_message(path) == expected  # still serving after all of them
        assert os.path.exists(path)
        if workers:  # not one crashed and was replaced
            assert worker_pids(milter.pid, workers) == pids


# -- issue 27.1: macros of a suspended async stage, while the peer pipelines macro packets ----

PIPELINED_CONNECTIONS = 2000
LATER_MACROS = 300


def pipelined_connect(path: str) -> bytes:
    """CONNECT with j=first, then macro packets with other values of j before its answer."""
    raw = RawConnection(path)
    try:
        raw.negotiate()
        packets = [w.encode_packet(b"D", b"Cj\0first\0")]
        packets.append(w.encode_packet(b"C", w.encode_connect(b"pipeliner", UnixAddress("/x"))))
        packets += [
            w.encode_packet(b"D", b"Cj\0later-%d-%s\0" % (n, b"x" * (n % 97)))
            for n in range(LATER_MACROS)
        ]
        raw.sock.sendall(b"".join(packets))
        return raw.answer()[0]
    finally:
        raw.close()


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--metrics", "127.0.0.1:0"),
        ("--workers", "2"),
        ("--workers", "2", "--metrics", "127.0.0.1:0"),
    ],
    ids=["one-process", "one-process-metrics", "workers-2", "workers-2-metrics"],
)
def test_async_stage_reads_macros_of_its_own_command_while_the_peer_pipelines(
    args: tuple[str, ...],
) -> None:
    workers = 2 if "--workers" in args else 0
    with start("AsyncMacroReader", *args) as milter:
        path = milter.spec.path
        pids = worker_pids(milter.pid, workers) if workers else []
        senders = Senders(PIPELINED_CONNECTIONS, lambda: pipelined_connect(path))
        senders.join()
        failures = senders.failures
        answers = {a: senders.results.count(a) for a in set(senders.results)}
        log = milter.log()
        assert not failures, f"{failures[:3]!r}\n{log[-3000:]}"
        # REJECT: a read after an await saw a later packet's j (or freed memory).
        assert answers == {w.CONTINUE: PIPELINED_CONNECTIONS}, answers
        assert milter.process is not None and milter.process.poll() is None
        if workers:  # not one crashed and was replaced
            assert worker_pids(milter.pid, workers) == pids
        assert "died" not in log, log[-3000:]
