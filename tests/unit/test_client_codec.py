"""Packet framing, payload encoding and decoding of the milter wire protocol, and the client's
errors against a misbehaving peer (a fake milter on a unix socket)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from pymilterkit import Actions, InetAddress, ProtocolOpts, Stage, Status, UnixAddress
from pymilterkit.testing import (
    BodyReplaced,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    MilterClient,
    MilterTimeout,
    Progress,
    ProtocolError,
    Quarantined,
    RecipientAdded,
    RecipientRemoved,
    Reply,
    SenderChanged,
)
from pymilterkit.testing import _wire as w
from pymilterkit.testing._envelope import (
    crlf_body,
    header_value_for_milter,
    normalize_macro_name,
    split_message,
)


def test_packet_framing_round_trip_in_any_pieces() -> None:
    data = w.encode_packet(b"h", b"X-A\0v\0") + w.encode_packet(b"c") + w.encode_packet(b"b",
                                                                                       b"\0" * 9)
    assert data[:5] == b"\x00\x00\x00\x07h"
    reader = w.PacketReader()
    packets = []
    for byte in data:  # one byte at a time
        reader.feed(bytes([byte]))
        while (packet := reader.next_packet()) is not None:
            packets.append(packet)
    assert packets == [(b"h", b"X-A\0v\0"), (b"c", b""), (b"b", b"\0" * 9)]
    assert reader.pending == 0


def test_reader_refuses_malformed_lengths() -> None:
    reader = w.PacketReader()
    reader.feed(b"\0\0\0\0")
    with pytest.raises(ProtocolError, match="length 0"):
        reader.next_packet()
    reader = w.PacketReader()
    reader.feed(struct.pack(">I", 1 << 30) + b"c")
    with pytest.raises(ProtocolError, match="absurd"):
        reader.next_packet()


def test_encode_packet_wants_one_command_byte() -> None:
    with pytest.raises(ValueError):
        w.encode_packet(b"ab")


def test_optneg_reply_with_macro_lists() -> None:
    data = struct.pack(">III", 6, 0x101, 0x37A)
    data += struct.pack(">I", 0) + b"j {daemon_name}\0" + struct.pack(">I", 5) + b"i\0"
    version, actions, protocol, macros = w.decode_optneg(data)
    assert version == 6
    assert actions == Actions.ADD_HEADER | Actions.SETSYMLIST
    assert protocol & ProtocolOpts.NO_HELO and not protocol & ProtocolOpts.NO_CONNECT
    assert macros == {Stage.CONNECT: ("j", "{daemon_name}"), Stage.EOM: ("i",)}
    with pytest.raises(ProtocolError):
        w.decode_optneg(b"\0" * 11)
    with pytest.raises(ProtocolError, match="unknown stage"):
        w.decode_optneg(data[:12] + struct.pack(">I", 9) + b"x\0")
    assert w.encode_optneg(6, 0x1FF, 0x1FFFFF) == struct.pack(">III", 6, 0x1FF, 0x1FFFFF)


@pytest.mark.parametrize(
    ("address", "wire"),
    [
        (InetAddress(IPv4Address("192.0.2.1"), 25), b"h\x004\x00\x19192.0.2.1\0"),
        (InetAddress(IPv6Address("2001:db8::1"), 587), b"h\x006\x02\x4b2001:db8::1\0"),
        (UnixAddress("/run/x.sock"), b"h\0L\0\0/run/x.sock\0"),
        (None, b"h\0U"),
    ],
)
def test_connect_payload_for_each_family(
    address: InetAddress | UnixAddress | None, wire: bytes
) -> None:
    assert w.encode_connect(b"h", address) == wire
    assert w.decode_connect(wire) == (b"h", address)


def test_connect_decoding_accepts_ipv6_prefix_and_refuses_garbage() -> None:
    assert w.decode_connect(b"h\x006\x00\x01IPv6:::1\0")[1] == InetAddress(IPv6Address("::1"), 1)
    for bad in (b"h", b"h\x004\x00", b"h\x004\x00\x01not-an-ip\0", b"h\x00Z\x00\x01x\0"):
        with pytest.raises(ProtocolError):
            w.decode_connect(bad)


def test_macro_and_argv_payloads() -> None:
    assert w.encode_macros(b"C", [(b"j", b"mx"), (b"{daemon_name}", b"d")]) == (
        b"Cj\0mx\0{daemon_name}\0d\0"
    )
    assert w.encode_argv([b"<a@b>", b"SIZE=10"]) == b"<a@b>\0SIZE=10\0"
    with pytest.raises(ValueError, match="NUL"):
        w.cstr(b"a\0b")


@pytest.mark.parametrize(
    ("cmd", "data", "expected"),
    [
        (b"h", b"X-A\0value\0", HeaderAdded("X-A", "value")),
        (b"i", b"\0\0\0\x02X-I\0v\0", HeaderInserted(2, "X-I", "v")),
        (b"m", b"\0\0\0\x01Subject\0new\0", HeaderChanged("Subject", 1, "new")),
        (b"m", b"\0\0\0\0Subject\0new\0", HeaderChanged("Subject", 1, "new")),
        (b"m", b"\0\0\0\x03X-D\0\0", HeaderDeleted("X-D", 3)),
        (b"e", b"<s@x>\0", SenderChanged("<s@x>", None)),
        (b"e", b"<s@x>\0RET=HDRS\0", SenderChanged("<s@x>", "RET=HDRS")),
        (b"+", b"<r@x>\0", RecipientAdded("<r@x>", None)),
        (b"2", b"<r@x>\0NOTIFY=NEVER\0", RecipientAdded("<r@x>", "NOTIFY=NEVER")),
        (b"-", b"<r@x>\0", RecipientRemoved("<r@x>")),
        (b"b", b"\xff\0body", BodyReplaced(b"\xff\0body")),
        (b"q", b"why\0", Quarantined("why")),
        (b"p", b"", Progress()),
        (b"h", b"X-8\0\xe9t\xe9\0", HeaderAdded("X-8", "\udce9t\udce9")),
    ],
)
def test_modification_packets(cmd: bytes, data: bytes, expected: object) -> None:
    assert w.decode_modification(cmd, data) == expected


@pytest.mark.parametrize(
    ("cmd", "data"),
    [(b"h", b"X-A\0"), (b"h", b"X-A\0v"), (b"i", b"\0\0"), (b"m", b"\0\0\0\x01X\0"),
     (b"+", b"a\0b\0"), (b"Z", b"")],
)
def test_malformed_modification_packets(cmd: bytes, data: bytes) -> None:
    with pytest.raises(ProtocolError):
        w.decode_modification(cmd, data)


def test_reply_parsing_single_multi_and_percent() -> None:
    reply = Reply.parse(b"550 5.7.1 100%% sure")
    assert reply == Reply("550", "5.7.1", ("100% sure",))
    assert str(reply) == "550 5.7.1 100% sure"
    multi = Reply.parse(b"451-4.3.0 one\r\n451-4.3.0 two\r\n451 4.3.0 three")
    assert multi == Reply("451", "4.3.0", ("one", "two", "three"))
    assert str(multi) == "451-4.3.0 one\r\n451-4.3.0 two\r\n451 4.3.0 three"
    assert Reply.parse(b"550 no code") == Reply("550", None, ("no code",))
    assert Reply.parse(b"550 %bad") == Reply("550", None, ("bad",))  # Postfix drops lone %
    assert Reply.default(Status.TEMPFAIL).code == "451"
    assert not Reply.default(Status.REJECT).custom


def test_split_message_like_postfix() -> None:
    raw = (
        b"From: a@x\r\nSubject: one\r\n two\r\n\tthree\r\nX-Empty:\r\nX-8: \xe9\r\n"
        b"\r\nbody line\nsecond\r\n"
    )
    headers, body = split_message(raw)
    assert headers == [
        (b"From", b" a@x"),
        (b"Subject", b" one\n two\n\tthree"),
        (b"X-Empty", b""),
        (b"X-8", b" \xe9"),
    ]
    assert body == b"body line\nsecond\r\n"
    assert crlf_body(body) == b"body line\r\nsecond\r\n"
    assert header_value_for_milter(b" one", False) == b"one"
    assert header_value_for_milter(b"  two", False) == b" two"
    assert header_value_for_milter(b" one", True) == b" one"


def test_split_message_stops_at_a_non_header_line() -> None:
    headers, body = split_message(b"Subject: s\nthis is not a header\nmore\n")
    assert headers == [(b"Subject", b" s")]
    assert body == b"this is not a header\nmore\n"
    assert split_message(b"") == ([], b"")


def test_macro_names_normalized() -> None:
    assert normalize_macro_name("{i}") == "i"
    assert normalize_macro_name("i") == "i"
    assert normalize_macro_name("daemon_name") == "{daemon_name}"
    assert normalize_macro_name("{daemon_name}") == "{daemon_name}"


# -- the client against a fake milter ------------------------------------------------------


@pytest.fixture
def fake_milter(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """Serve one connection with `behaviour(conn)` on a unix socket; returns the spec."""
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(behaviour: Callable[[socket.socket], None]) -> str:
        path = str(tmp_path / f"fake{len(servers)}.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        server.settimeout(10)
        servers.append(server)

        def serve() -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                behaviour(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return f"unix:{path}"

    yield start
    for server in servers:
        server.close()
    for thread in threads:
        thread.join(10)


def _read_packet(conn: socket.socket) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    (size,) = struct.unpack(">I", head)
    body = b""
    while len(body) < size:
        body += conn.recv(size - len(body))
    return body[:1], body[1:]


def _negotiate(conn: socket.socket, protocol: int = 0) -> None:
    assert _read_packet(conn)[0] == b"O"
    conn.sendall(w.encode_packet(b"O", struct.pack(">III", 6, 0, protocol)))


def test_client_reports_a_milter_that_hangs_up(
    fake_milter: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    def behaviour(conn: socket.socket) -> None:
        _negotiate(conn)
        _read_packet(conn)  # macros
        _read_packet(conn)  # connect: hang up without answering

    spec = fake_milter(behaviour)
    with pytest.raises(ProtocolError, match="closed the connection during connect"):
        MilterClient(spec, timeout=5).run(b"Subject: x\r\n\r\n")


def test_client_times_out_naming_the_stage(
    fake_milter: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    done = threading.Event()

    def behaviour(conn: socket.socket) -> None:
        _negotiate(conn, protocol=int(ProtocolOpts.NO_CONNECT | ProtocolOpts.NO_HELO))
        done.wait(10)

    spec = fake_milter(behaviour)
    try:
        with pytest.raises(MilterTimeout, match=r"did not answer mail within 0\.3 s"):
            MilterClient(spec, timeout=0.3).run(b"Subject: x\r\n\r\n")
    finally:
        done.set()


def test_client_refuses_malformed_packets(
    fake_milter: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    def behaviour(conn: socket.socket) -> None:
        _negotiate(conn, protocol=int(ProtocolOpts.NO_CONNECT | ProtocolOpts.NO_HELO))
        # Macros come even for skipped stages; read up to the MAIL command.
        for _ in range(10):
            if _read_packet(conn)[0] == b"M":
                break
        conn.sendall(w.encode_packet(b"y", b"550 no terminator"))

    spec = fake_milter(behaviour)
    with pytest.raises(ProtocolError, match="malformed reply to mail"):
        MilterClient(spec, timeout=5).run(b"Subject: x\r\n\r\n")


def test_client_refuses_unoffered_actions(
    fake_milter: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    def behaviour(conn: socket.socket) -> None:
        _read_packet(conn)
        conn.sendall(w.encode_packet(b"O", struct.pack(">III", 6, 0x1FF, 0)))

    spec = fake_milter(behaviour)
    client = MilterClient(spec, timeout=5, actions=Actions.ADD_HEADER)
    with pytest.raises(ProtocolError, match="not offered"):
        client.run(b"Subject: x\r\n\r\n")


def test_client_cannot_connect_to_nothing(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="cannot connect"):
        MilterClient(f"unix:{tmp_path}/none.sock", timeout=1).run(b"")


def test_client_accepts_postfix_inet_syntax() -> None:
    from pymilterkit.testing._client import parse_client_spec

    assert parse_client_spec("inet:127.0.0.1:3000").connect_address() == ("127.0.0.1", 3000)
    assert parse_client_spec("inet:3000@localhost").connect_address() == ("localhost", 3000)
    assert parse_client_spec("inet6:25@[::1]").connect_address() == ("::1", 25)
