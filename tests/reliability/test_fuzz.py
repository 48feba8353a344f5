"""Hostile wire input: a hypothesis-driven fuzzer against a running pymilterkit milter.

Each case opens a connection to the milter (`FuzzTarget`: every stage, every action) over its
unix socket and sends one of: a valid conversation mutated (packets dropped, duplicated, swapped
out of order, bytes flipped, length prefixes rewritten, random packets inserted, cut short),
random bytes, or a packet announcing an absurd length. Meanwhile a good client on another
thread keeps sending complete messages and checks every answer. The milter must never die,
the good client must never see a wrong answer, and at the end, after SIGTERM, the milter exits 0
and logs "0 left open" and no traceback.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymilterkit import InetAddress
from pymilterkit.testing import MilterClient, MilterProcess
from pymilterkit.testing import _wire as w

from .soak import Message, run_message

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
CASES = 6000

_U32 = struct.Struct(">I")


def valid_stream() -> list[bytes]:
    """A complete, valid conversation as packets (Postfix-like)."""
    packets = [
        (w.OPTNEG, w.encode_optneg(6, 0x1FF, 0x1FFFFF)),
        (w.MACRO, w.encode_macros(w.CONNECT, [(b"j", b"mx.example.org")])),
        (w.CONNECT, w.encode_connect(b"client.example",
                                     InetAddress(IPv4Address("192.0.2.1"), 25))),
        (w.HELO, b"helo.example\0"),
        (w.MAIL, b"<a@example.net>\0SIZE=10\0"),
        (w.RCPT, b"<b@example.com>\0"),
        (w.RCPT, b"<c@example.com>\0NOTIFY=NEVER\0"),
        (w.DATA, b""),
        (w.HEADER, b"Subject\0hello\0"),
        (w.HEADER, b"X-Remove-Me\0yes\0"),
        (w.EOH, b""),
        (w.BODY, b"body line\r\n"),
        (w.BODYEOB, b""),
        (w.ABORT, b""),
        (w.MAIL, b"<d@example.net>\0"),
        (w.UNKNOWN, b"XFOO\0"),
        (w.QUIT_NC, b""),
        (w.QUIT, b""),
    ]
    return [w.encode_packet(cmd, data) for cmd, data in packets]


COMMANDS = list(b"ABCDEHKLMNOQRTUX\0\xff")


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    packets = valid_stream()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(
            ["drop", "dup", "swap", "flip", "length", "insert", "truncate-packet"]))
        i = draw(st.integers(0, len(packets) - 1))
        if op == "drop" and len(packets) > 1:
            del packets[i]
        elif op == "dup":
            packets.insert(i, packets[i])
        elif op == "swap":
            j = draw(st.integers(0, len(packets) - 1))
            packets[i], packets[j] = packets[j], packets[i]
        elif op == "flip" and packets[i]:
            raw = bytearray(packets[i])
            pos = draw(st.integers(0, len(raw) - 1))
            raw[pos] = draw(st.integers(0, 255))
            packets[i] = bytes(raw)
        elif op == "length":
            size = draw(st.sampled_from(
                [0, 1, 2, 5, 65535, 65536, 65537, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF]))
            packets[i] = _U32.pack(size) + packets[i][4:]
        elif op == "insert":
            cmd = draw(st.sampled_from(COMMANDS))
            data = draw(st.binary(max_size=300))
            packets.insert(i, w.encode_packet(bytes([cmd]), data))
        elif op == "truncate-packet":
            packets[i] = packets[i][: draw(st.integers(0, len(packets[i])))]
    stream = b"".join(packets)
    if draw(st.booleans()):
        stream = stream[: draw(st.integers(0, len(stream)))]
    return stream


@st.composite
def oversized(draw: st.DrawFn) -> bytes:
    size = draw(st.integers(65536, 0xFFFFFFFF))
    cmd = draw(st.sampled_from(COMMANDS))
    prefix = valid_stream()[: draw(st.integers(0, 6))]
    return b"".join(prefix) + _U32.pack(size) + bytes([cmd]) + draw(st.binary(max_size=2000))


hostile = st.one_of(
    mutated_stream(),
    st.binary(min_size=1, max_size=4000),
    oversized(),
    # A valid negotiation, then garbage in the middle of a session.
    st.binary(max_size=600).map(lambda junk: b"".join(valid_stream()[:5]) + junk),
)


class GoodClient(threading.Thread):
    """Sends complete messages in a loop and checks every answer."""

    def __init__(self, socket_spec: str) -> None:
        super().__init__(daemon=True)
        self.client = MilterClient(socket_spec, timeout=20)
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        message = Message("<good@example.net>", ["<g1@example.com>", "<g2@example.com>"],
                          [("Subject", "good"), ("X-Remove-Me", "x")], b"good body\r\n")
        while not self.stop.is_set():
            try:
                conn = self.client.open()
                conn.negotiate()
                conn.connect("good.example", None)
                conn.helo("good.example")
                for _ in range(3):
                    run_message(conn, message, True, Counter())
                    self.ok += 1
                conn.quit()
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if len(self.failures) > 5:
                    return


@pytest.fixture(scope="module")
def target() -> Iterator[MilterProcess]:
    with MilterProcess("tests.reliability.filters:FuzzTarget", cwd=ROOT,
                       args=["--timeout", "5"]) as milter:
        yield milter


def send_hostile(path: str, data: bytes, how: int) -> int:
    """Send `data`, then hang up (`how` 0) or half-close and read; returns bytes received."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
        with contextlib.suppress(OSError):
            sock.sendall(data)
        if how == 0:
            return 0  # hang up at once
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        # Read until the milter closes; libmilter must end the session on bad input or EOF.
        received = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                return received
            if not chunk:
                return received
            received += len(chunk)
        raise AssertionError(f"the milter kept a hostile connection open: {data[:80]!r}")
    finally:
        sock.close()


def test_hostile_input_never_hurts_the_milter_or_other_clients(target: MilterProcess) -> None:
    good = GoodClient(target.socket)
    good.start()
    cases = Counter[str]()
    assert target.process is not None

    @settings(max_examples=CASES, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=hostile, how=st.integers(0, 3))
    def fuzz(data: bytes, how: int) -> None:
        cases["run"] += 1
        if send_hostile(target.spec.path, data, how):
            cases["answered"] += 1
        assert target.process is not None and target.process.poll() is None, target.log()

    try:
        fuzz()
    finally:
        good.stop.set()
        good.join(30)
    print(f"fuzz: {cases['run']} hostile connections ({cases['answered']} got answers before "
          f"the milter hung up); good client: {good.ok} messages right, "
          f"{len(good.failures)} failures")
    assert good.failures == []
    assert good.ok > 0
    assert target.process.poll() is None, "the milter died"
    time.sleep(0.5)  # the last hostile sessions are being closed
    target.signal(signal.SIGTERM)
    assert target.wait(20) == 0
    log = target.log()
    assert "Traceback" not in log and "Exception ignored" not in log, log[-3000:]
    stopped = [line for line in log.splitlines() if "stopped:" in line]
    assert stopped and " 0 left open" in stopped[-1], log[-3000:]
