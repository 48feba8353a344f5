"""The client over TCP: `inet:` and `inet6:` specs (loopback only), against the real runner."""

from __future__ import annotations

import socket

import pytest

from pymilterkit.testing import MilterClient, MilterProcess

pytestmark = pytest.mark.integration

MESSAGE = b"Subject: tcp\r\n\r\nbody\r\n"


def _free_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_inet_spec_and_postfix_style_spec() -> None:
    port = _free_port(socket.AF_INET, "127.0.0.1")
    with MilterProcess("examples.rcpt_count:RcptCount", f"inet:{port}@127.0.0.1") as process:
        for spec in (process.socket, f"inet:127.0.0.1:{port}"):
            result = MilterClient(spec, timeout=10).run(MESSAGE, recipients=["a@x", "b@x"])
            assert result.header("X-Rcpt-Count") == "2"


def test_inet6_spec() -> None:
    if not _has_ipv6_loopback():
        pytest.fail("this machine has no IPv6 loopback (::1); the test needs one")
    port = _free_port(socket.AF_INET6, "::1")
    with MilterProcess("examples.rcpt_count:RcptCount", f"inet6:{port}@[::1]") as process:
        result = MilterClient(process.socket, timeout=10).run(MESSAGE)
        assert result.header("X-Rcpt-Count") == "1"
