"""The wire client against milters nobody here wrote: Debian's opendkim, and a pymilter filter.

Both run as child processes on unix sockets in temporary directories and are stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from pymilterkit import InetAddress, Status
from pymilterkit.testing import (
    ClientInfo,
    HeaderChanged,
    MilterClient,
    Step,
    apply_modifications,
)

from .foreign import require_pymilter

pytestmark = pytest.mark.integration

FOREIGN = Path(__file__).parent / "foreign"
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: signed test\r\n"
    b"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <test-1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"this message should be signed.\r\n"
)


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    log = path.with_suffix(".log")
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(f"{what} exited with {process.returncode} during start:\n{out}")
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    pytest.fail(f"{what} did not listen on {path} within 15 s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            # libmilter may take up to 5 s to notice a stop; these tests need no clean exit.
            process.wait(1)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)


@pytest.fixture
def opendkim(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("opendkim") or "/usr/sbin/opendkim"
    genkey = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
    assert os.path.exists(binary) and os.path.exists(genkey), "opendkim must be installed"
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    subprocess.run([genkey, "-D", str(keys), "-d", "example.org", "-s", "test"], check=True,
                   timeout=60)
    sock = tmp_path / "dkim.sock"
    conf = tmp_path / "opendkim.conf"
    conf.write_text(
        f"Socket local:{sock}\n"
        "Mode s\n"
        "Domain example.org\n"
        "Selector test\n"
        f"KeyFile {keys / 'test.private'}\n"
        "Background no\n"
        "Syslog no\n"
        # pytest's temporary directories live under /tmp, which opendkim calls unsafe.
        "RequireSafeKeys false\n"
        "Canonicalization relaxed/simple\n"
        f"PidFile {tmp_path / 'opendkim.pid'}\n"
    )
    process = _start([binary, "-f", "-x", str(conf)], sock.with_suffix(".log"))
    try:
        _wait_for_socket(sock, process, "opendkim")
        yield f"unix:{sock}"
    finally:
        _stop(process)


def test_opendkim_signs_a_message(opendkim: str) -> None:
    # opendkim signs mail from its internal hosts (127.0.0.1 by default).
    client = MilterClient(
        opendkim,
        timeout=20,
        client=ClientInfo(hostname="localhost",
                          address=InetAddress(IPv4Address("127.0.0.1"), 40000)),
    )
    conn = client.run_connection([MESSAGE])
    result = conn.messages[0]
    assert result.status is Status.ACCEPT and result.stage is Step.EOM
    signature = result.header("DKIM-Signature")
    assert signature is not None, result
    tags = dict(
        part.strip().split("=", 1) for part in signature.replace("\n", "").split(";")
        if "=" in part
    )
    assert tags["d"] == "example.org"
    assert tags["s"] == "test"
    assert tags["a"] == "rsa-sha256"
    # opendkim inserts its header at the top; the delivered message carries it.
    delivered = apply_modifications(MESSAGE, result)
    assert delivered.startswith(b"DKIM-Signature:") or b"\r\nDKIM-Signature:" in delivered
    assert delivered.endswith(b"this message should be signed.\r\n")


@pytest.fixture
def pymilter_filter(tmp_path: Path) -> Iterator[str]:
    require_pymilter()
    sock = tmp_path / "pymilter.sock"
    process = _start([sys.executable, str(FOREIGN / "pymilter_filter.py"), f"unix:{sock}"],
                     sock.with_suffix(".log"))
    try:
        _wait_for_socket(sock, process, "the pymilter filter")
        yield f"unix:{sock}"
    finally:
        _stop(process)


def test_pymilter_filter_modifies_and_rejects(pymilter_filter: str) -> None:
    client = MilterClient(pymilter_filter, timeout=20)
    conn = client.run_connection([
        MESSAGE,
        MESSAGE,
    ])
    first, second = conn.messages
    assert first.status is Status.ACCEPT and first.stage is Step.EOM
    assert first.header("X-Pymilter-Rcpts") == "1"
    assert HeaderChanged("Subject", 1, "[seen] signed test") in first.modifications
    assert first.new_body == b"replaced by pymilter\r\n"
    assert second.header("X-Pymilter-Rcpts") == "1"
    delivered = apply_modifications(MESSAGE, first)
    assert b"Subject: [seen] signed test\r\n" in delivered
    assert delivered.endswith(b"\r\n\r\nreplaced by pymilter\r\n")

    from pymilterkit.testing import Envelope

    refused = client.run(MESSAGE, envelope=Envelope.of("bad@example.org", ["x@example.net"]))
    assert refused.status is Status.REJECT and refused.stage is Step.MAIL
    assert refused.reply is not None and str(refused.reply) == "550 5.7.1 pymilter says no"
