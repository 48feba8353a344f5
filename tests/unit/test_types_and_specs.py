"""EsmtpParams, addresses and socket specs."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from pymilterkit import EsmtpParams, InetAddress, SocketSpecError, UnixAddress
from pymilterkit._socketspec import parse_socket_spec


def test_esmtp_params_case_insensitive_and_bare_keywords() -> None:
    params = EsmtpParams(["SIZE=1024", "body=8BITMIME", "SMTPUTF8"])
    assert params["size"] == "1024"
    assert params["BODY"] == "8BITMIME"
    assert params["SmtpUtf8"] is None
    assert "smtputf8" in params
    assert "RET" not in params
    assert sorted(params) == ["BODY", "SIZE", "SMTPUTF8"]
    assert len(params) == 3
    assert str(params) == "SIZE=1024 body=8BITMIME SMTPUTF8"
    assert EsmtpParams.parse(str(params)) == params
    with pytest.raises(KeyError):
        params["RET"]


def test_esmtp_params_value_with_equals_sign() -> None:
    assert EsmtpParams(["ORCPT=rfc822;a=b@example.com"])["orcpt"] == "rfc822;a=b@example.com"


def test_addresses() -> None:
    assert str(InetAddress(IPv4Address("192.0.2.1"), 25)) == "192.0.2.1:25"
    assert str(InetAddress(IPv6Address("::1"), 25)) == "[::1]:25"
    assert str(UnixAddress("/run/x")) == "/run/x"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("unix:/run/m.sock", "unix:/run/m.sock"),
        ("local:/run/m.sock", "unix:/run/m.sock"),
        ("/run/m.sock", "unix:/run/m.sock"),
        ("inet:3000", "inet:3000"),
        ("inet:3000@localhost", "inet:3000@localhost"),
        ("INET:3000@[127.0.0.1]", "inet:3000@[127.0.0.1]"),
        ("inet6:3000@[::1]", "inet6:3000@[::1]"),
        ("inet:smtp@localhost", "inet:25@localhost"),
        ("fd:3", "fd:3"),
    ],
)
def test_socket_specs(spec: str, expected: str) -> None:
    assert parse_socket_spec(spec).libmilter() == expected


@pytest.mark.parametrize(
    "spec",
    ["", "unix:", "inet:", "inet:0", "inet:70000", "inet:nosuchservice@x", "tcp:25",
     "inet:25@[::1", "fd:x", "unix:/" + "x" * 120, "unix:/a\0b"],
)
def test_bad_socket_specs(spec: str) -> None:
    with pytest.raises(SocketSpecError):
        parse_socket_spec(spec)
