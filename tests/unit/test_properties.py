"""Property tests (hypothesis) for everything that validates or converts.

Valid input round-trips exactly (what a filter gives is what reaches libmilter, byte for byte);
invalid input raises a `MilterError` subclass whose message names the problem, and nothing
reaches the backend (which stands in for libmilter).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    InvalidArgumentError,
    MilterError,
    MilterSession,
    Status,
    UnixAddress,
)
from pymilterkit._dispatch import SessionRules
from pymilterkit._errors import SocketSpecError
from pymilterkit._socketspec import parse_socket_spec
from pymilterkit.testing import Reply
from pymilterkit.testing import _wire as w

from .test_session import Recorder, attach

props = settings(max_examples=150, deadline=None)


class Everything(MilterSession):
    actions = (
        Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.CHANGE_FROM | Actions.ADD_RCPT
        | Actions.ADD_RCPT_PAR | Actions.DELETE_RCPT | Actions.QUARANTINE
    )

    @override
    def on_eom(self) -> Status:
        return Status.CONTINUE


def session() -> tuple[Everything, Recorder]:
    s = Everything()
    return s, attach(s)


# -- strategies ----------------------------------------------------------------------------

NAME_BYTES = bytes(b for b in range(0x21, 0x7F) if b != ord(":"))
header_names = st.binary(min_size=1, max_size=60).map(
    lambda raw: bytes(NAME_BYTES[b % len(NAME_BYTES)] for b in raw)
)
# One line of a value: any byte but NUL, CR, LF (8-bit included).
line_bytes = st.binary(max_size=80).map(lambda b: b.replace(b"\0", b"").replace(b"\r", b"")
                                        .replace(b"\n", b""))
folds = st.sampled_from([b"\n ", b"\n\t", b"\r\n ", b"\r\n\t"])


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(line_bytes, min_size=1, max_size=5))
    out = parts[0]
    for part in parts[1:]:
        out += draw(folds) + part
    return out


@st.composite
def injected(draw: st.DrawFn, base: st.SearchStrategy[bytes], bad: bytes) -> bytes:
    """`base` with `bad` (a line break not followed by white space, or NUL) put in."""
    raw = draw(base)
    at = draw(st.integers(0, len(raw)))
    tail = raw[at:]
    if bad in (b"\n", b"\r\n", b"\r") and (tail[:1] in (b" ", b"\t") or (bad == b"\r"
                                          and tail[:1] == b"\n")):
        tail = b"X" + tail
    return raw[:at] + bad + tail


# -- headers -------------------------------------------------------------------------------


@props
@given(name=header_names, value=header_values(), as_text=st.booleans())
def test_valid_headers_reach_libmilter_byte_for_byte(name: bytes, value: bytes,
                                                     as_text: bool) -> None:
    s, rec = session()
    if as_text:
        s.add_header(name.decode("ascii"), value.decode("utf-8", "surrogateescape"))
    else:
        s.add_header(name, value)
    s.insert_header(3, name, value)
    if value:
        s.change_header(name, value, 2)
    else:  # the MTA would read it as a delete: refused (None deletes)
        with pytest.raises(InvalidArgumentError, match="pass None to delete"):
            s.change_header(name, value, 2)
    assert rec.calls == [("add_header", name, value), ("insert_header", 3, name, value),
                         *([("change_header", name, 2, value)] if value else [])]


@props
@given(name=header_names, value=header_values(),
       bad=st.sampled_from([b"\n", b"\r", b"\r\n", b"\0"]), data=st.data())
def test_header_injection_is_refused(name: bytes, value: bytes, bad: bytes,
                                     data: st.DataObject) -> None:
    hostile = data.draw(injected(st.just(value), bad))
    s, rec = session()
    calls: list[Callable[[], None]] = [
        lambda: s.add_header(name, hostile),
        lambda: s.insert_header(0, name, hostile),
        lambda: s.change_header(name, hostile),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError) as info:
            call()
        text = str(info.value)
        assert ("NUL" in text) if bad == b"\0" else ("line break" in text), text
        assert "header value" in text
    assert rec.calls == []


@props
@given(name=st.binary(min_size=0, max_size=30), data=st.data())
def test_bad_header_names_are_refused(name: bytes, data: st.DataObject) -> None:
    bad = data.draw(st.sampled_from(
        [b":", b" ", b"\t", b"\r", b"\n", b"\0", b"\x7f", b"\xff", b"\x1b"]))
    hostile = name[: len(name) // 2] + bad + name[len(name) // 2 :]
    s, rec = session()
    with pytest.raises(InvalidArgumentError, match="invalid header name"):
        s.add_header(hostile, "v")
    with pytest.raises(InvalidArgumentError, match="invalid header name"):
        s.change_header(hostile, None)
    assert rec.calls == []


def test_empty_header_name_is_refused() -> None:
    s, rec = session()
    with pytest.raises(InvalidArgumentError, match="invalid header name"):
        s.add_header("", "v")
    assert rec.calls == []


@props
@given(size=st.integers(65536 - 40, 70000))
def test_oversized_headers_are_refused(size: int) -> None:
    s, rec = session()
    if 1 + size + 2 > 65535:
        with pytest.raises(InvalidArgumentError, match="65535"):
            s.add_header("X", b"v" * size)
        assert rec.calls == []
    else:
        s.add_header("X", b"v" * size)


# -- replies -------------------------------------------------------------------------------

reply_lines = st.lists(
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\0"),
             max_size=60),
    max_size=32,
)


@st.composite
def codes(draw: st.DrawFn) -> tuple[str, str | None]:
    cls = draw(st.sampled_from("45"))
    code = cls + draw(st.from_regex(r"\A[0-9]{2}\Z"))
    if draw(st.booleans()):
        return code, None
    return code, f"{cls}.{draw(st.integers(0, 999))}.{draw(st.integers(0, 999))}"


@props
@given(code=codes(), lines=reply_lines)
def test_valid_replies_round_trip_through_the_wire(code: tuple[str, str | None],
                                                   lines: list[str]) -> None:
    s, rec = session()
    SessionRules.enter(s, "on_rcpt")
    s.set_reply(code[0], code[1], *lines)
    [(_, raw_code, raw_x, raw_lines)] = rec.calls
    assert raw_code == code[0].encode()
    assert raw_x == (code[1].encode() if code[1] else None)
    assert [line.replace(b"%%", b"%") for line in raw_lines] == [
        line.encode("utf-8", "surrogateescape") for line in lines]
    # What libmilter puts on the wire, as the MTA side parses it: the original text.
    xcode = code[1] or f"{code[0][0]}.0.0"
    texts = [line.decode("utf-8", "surrogateescape") for line in raw_lines] or [""]
    wire = "\r\n".join(f"{code[0]}{'-' if n < len(texts) - 1 else ' '}{xcode} {t}"
                       for n, t in enumerate(texts))
    parsed = Reply.parse(wire.encode("utf-8", "surrogateescape"))
    assert parsed.code == code[0] and parsed.xcode == xcode
    assert list(parsed.lines) == (lines or [""])


@props
@given(code=st.text(max_size=5), data=st.data())
def test_bad_reply_codes_are_refused(code: str, data: st.DataObject) -> None:
    s, rec = session()
    SessionRules.enter(s, "on_rcpt")
    if len(code) == 3 and code[0] in "45" and code[1:].isdigit() and code.isascii():
        code = "2" + code[1:]
    with pytest.raises(InvalidArgumentError, match="reply code"):
        s.set_reply(code, None, "text")
    cls = data.draw(st.sampled_from("45"))
    other = "5" if cls == "4" else "4"
    with pytest.raises(InvalidArgumentError, match="does not match"):
        s.set_reply(f"{cls}50", f"{other}.1.1", "text")
    assert rec.calls == []


@props
@given(lines=reply_lines.filter(bool), bad=st.sampled_from(["\r", "\n", "\r\n", "\0"]),
       data=st.data())
def test_reply_line_injection_is_refused(lines: list[str], bad: str,
                                         data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(lines) - 1))
    at = data.draw(st.integers(0, len(lines[index])))
    lines[index] = lines[index][:at] + bad + "250 fake" + lines[index][at:]
    s, rec = session()
    SessionRules.enter(s, "on_rcpt")
    with pytest.raises(InvalidArgumentError, match=f"reply line {index + 1}"):
        s.set_reply("550", "5.7.1", *lines)
    assert rec.calls == []


def test_too_many_or_too_long_reply_lines_are_refused() -> None:
    s, rec = session()
    SessionRules.enter(s, "on_rcpt")
    with pytest.raises(InvalidArgumentError, match="at most 32 lines"):
        s.set_reply("550", None, *["x"] * 33)
    with pytest.raises(InvalidArgumentError, match="'%' counts twice"):
        s.set_reply("550", None, "%" * 491)
    s.set_reply("550", None, "%" * 490)
    assert len(rec.calls) == 1


# -- envelope addresses and ESMTP parameters -------------------------------------------------

addresses = line_bytes.filter(lambda b: bool(b.strip()))


@props
@given(address=addresses, params=st.none() | line_bytes)
def test_envelope_addresses_round_trip(address: bytes, params: bytes | None) -> None:
    s, rec = session()
    s.change_sender(address, params)
    s.add_recipient(address.decode("utf-8", "surrogateescape"),
                    None if params is None else params.decode("utf-8", "surrogateescape"))
    s.remove_recipient(address)
    added = ("add_recipient", address) if params is None else (
        "add_recipient_par", address, params)
    assert rec.calls == [("change_sender", address, params), added,
                         ("remove_recipient", address)]


@props
@given(address=addresses, bad=st.sampled_from([b"\r", b"\n", b"\0"]), data=st.data())
def test_envelope_injection_is_refused(address: bytes, bad: bytes, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(address)))
    hostile = address[:at] + bad + b"RCPT TO:<evil@example.com>" + address[at:]
    s, rec = session()
    calls: list[tuple[Callable[[], None], str]] = [
        (lambda: s.change_sender(hostile), "sender"),
        (lambda: s.add_recipient(hostile), "recipient"),
        (lambda: s.remove_recipient(hostile), "recipient"),
        (lambda: s.add_recipient("<ok@example.com>", hostile), "recipient parameters"),
        (lambda: s.quarantine(hostile.decode("utf-8", "surrogateescape")), "quarantine reason"),
    ]
    for call, what in calls:
        with pytest.raises(InvalidArgumentError, match=what) as info:
            call()
        assert ("NUL" in str(info.value)) if bad == b"\0" else ("CR or LF" in str(info.value))
    assert rec.calls == []


esmtp_keyword = st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,10}\Z")
esmtp_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@props
@given(pairs=st.lists(st.tuples(esmtp_keyword, st.none() | esmtp_value), max_size=6,
                      unique_by=lambda p: p[0].upper()))
def test_esmtp_params_parse_and_round_trip(pairs: list[tuple[str, str | None]]) -> None:
    args = [k if v is None else f"{k}={v}" for k, v in pairs]
    params = EsmtpParams(args)
    assert str(params) == " ".join(args)
    assert EsmtpParams.parse(str(params)) == params
    assert params.args == tuple(args)
    assert len(params) == len(pairs)
    for key, value in pairs:
        assert params[key.lower()] == value and params[key.upper()] == value
        assert key.swapcase() in params
    assert "NO-SUCH-KEY-X" not in params


# -- socket specs --------------------------------------------------------------------------

unix_paths = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                   blacklist_characters="\0"), min_size=1, max_size=100).map(
    lambda p: "/" + p.lstrip(":"))


@props
@given(path=unix_paths, prefix=st.sampled_from(["unix:", "local:", "UNIX:", ""]))
def test_unix_specs_round_trip(path: str, prefix: str) -> None:
    if not prefix:
        # A bare path is taken as one only without ':' (libmilter reads "x:" as a type).
        path = path.replace(":", "_")
    spec = parse_socket_spec(prefix + path)
    assert spec.kind == "unix" and spec.path == path
    assert spec.libmilter() == f"unix:{path}"
    assert parse_socket_spec(spec.libmilter()) == spec


hosts = st.one_of(
    st.just(""),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}\Z"),
)


@props
@given(kind=st.sampled_from(["inet", "inet6", "INET"]), port=st.integers(1, 65535), host=hosts)
def test_inet_specs_round_trip(kind: str, port: int, host: str) -> None:
    text = f"{kind}:{port}" + (f"@{host}" if host else "")
    spec = parse_socket_spec(text)
    assert (spec.kind, spec.port, spec.host) == (kind.lower(), port, host)
    assert parse_socket_spec(spec.libmilter()) == spec


@props
@given(port=st.integers(max_value=0) | st.integers(min_value=65536))
def test_out_of_range_ports_are_refused(port: int) -> None:
    text = f"inet:{port}@127.0.0.1"
    with pytest.raises(SocketSpecError) as info:
        parse_socket_spec(text)
    message = str(info.value)
    assert ("out of range" in message) or ("unknown port" in message), message


@props
@given(kind=st.from_regex(r"\A[a-z]{1,8}\Z").filter(
    lambda k: k not in ("unix", "local", "inet", "inet6", "fd")))
def test_unknown_socket_types_are_refused(kind: str) -> None:
    with pytest.raises(SocketSpecError, match=f"unknown socket type '{kind}'"):
        parse_socket_spec(f"{kind}:whatever")


@props
@given(spec=st.text(max_size=40))
def test_any_text_parses_or_raises_a_milter_error(spec: str) -> None:
    try:
        parse_socket_spec(spec)
    except MilterError as exc:
        assert str(exc)


# -- client addresses (libmilter's sockaddr) -------------------------------------------------


def sockaddr(raw: bytes) -> int:
    buffer = ctypes.create_string_buffer(raw, 128)
    _keep.append(buffer)
    return ctypes.addressof(buffer)


_keep: list[ctypes.Array[ctypes.c_char]] = []


@props
@given(ip=st.ip_addresses(v=4), port=st.integers(0, 65535))
def test_ipv4_sockaddr_converts(ip: IPv4Address, port: int) -> None:
    from pymilterkit._libmilter import sockaddr_to_address

    raw = struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) + ip.packed + b"\0" * 8
    assert sockaddr_to_address(sockaddr(raw)) == InetAddress(ip, port)
    _keep.clear()


@props
@given(ip=st.ip_addresses(v=6), port=st.integers(0, 65535))
def test_ipv6_sockaddr_converts(ip: IPv6Address, port: int) -> None:
    from pymilterkit._libmilter import sockaddr_to_address

    raw = (struct.pack("=H", socket.AF_INET6) + struct.pack(">H", port) + b"\0" * 4
           + ip.packed + b"\0" * 4)
    assert sockaddr_to_address(sockaddr(raw)) == InetAddress(ip, port)
    _keep.clear()


@props
@given(path=st.binary(max_size=107).map(lambda b: b.replace(b"\0", b"")))
def test_unix_sockaddr_converts(path: bytes) -> None:
    from pymilterkit._libmilter import sockaddr_to_address

    raw = struct.pack("=H", socket.AF_UNIX) + path + b"\0"
    assert sockaddr_to_address(sockaddr(raw)) == UnixAddress(
        path.decode("utf-8", "surrogateescape"))
    _keep.clear()


@props
@given(family=st.integers(0, 65535).filter(
    lambda f: f not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)))
def test_unknown_families_and_null_give_none(family: int) -> None:
    from pymilterkit._libmilter import sockaddr_to_address

    assert sockaddr_to_address(sockaddr(struct.pack("=H", family) + b"\1" * 30)) is None
    assert sockaddr_to_address(None) is None
    assert sockaddr_to_address(0) is None
    _keep.clear()


# -- the testing toolkit's wire codec ----------------------------------------------------------


@props
@given(packets=st.lists(st.tuples(st.binary(min_size=1, max_size=1),
                                  st.binary(max_size=300)), max_size=10),
       cuts=st.lists(st.integers(1, 50), max_size=20))
def test_packets_survive_any_split(packets: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(w.encode_packet(c, d) for c, d in packets)
    reader = w.PacketReader()
    out: list[w.Packet] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[pos : pos + cut])
        pos += cut
        while (packet := reader.next_packet()) is not None:
            out.append(packet)
    reader.feed(stream[pos:])
    while (packet := reader.next_packet()) is not None:
        out.append(packet)
    assert out == packets and reader.pending == 0


@props
@given(host=line_bytes, address=st.one_of(
    st.none(),
    st.builds(InetAddress, st.ip_addresses(), st.integers(0, 65535)),
    st.builds(UnixAddress, st.text(st.characters(blacklist_categories=["Cs"],
                                                 blacklist_characters="\0"), max_size=50)),
))
def test_connect_payload_round_trips(host: bytes,
                                     address: InetAddress | UnixAddress | None) -> None:
    assert w.decode_connect(w.encode_connect(host, address)) == (host, address)


@props
@given(strings=st.lists(line_bytes, min_size=1, max_size=6))
def test_nul_terminated_strings_round_trip(strings: list[bytes]) -> None:
    data = b"".join(w.cstr(s) for s in strings)
    assert w.split_strings(data, "test") == strings
