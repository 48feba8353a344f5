"""The throwaway Postfix itself works: delivery to the sink, hold queue, milter sockets, teardown.

These tests do not use pymilterkit, so a failure here points at the test infrastructure (or the
machine's Postfix), not at the library.
"""

from __future__ import annotations

import smtplib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .postfix import PostfixFactory, PostfixInstance, grant_postfix_access

MESSAGE = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: bob@example.com, carol@example.org\r\n"
    b"Subject: smoke test\r\n"
    b"\r\n"
    b"Hello from the smoke test.\r\n"
)
RECIPIENTS = ["bob@example.com", "carol@example.org"]


def send(instance: PostfixInstance, recipients: list[str] = RECIPIENTS) -> None:
    with smtplib.SMTP("127.0.0.1", instance.smtp_port, timeout=30) as smtp:
        smtp.sendmail("alice@example.net", recipients, MESSAGE)


def test_delivers_to_the_sink_and_stops_cleanly(postfix_factory: PostfixFactory) -> None:
    instance = postfix_factory()
    master = instance.master_pid
    assert master is not None and instance.is_running()

    send(instance)
    [delivered] = instance.wait_for_delivery(1)

    assert delivered.sender == "alice@example.net"
    assert sorted(delivered.recipients) == RECIPIENTS
    assert delivered.message["Subject"] == "smoke test"
    assert "by mta.pymilterkit.test (Postfix)" in str(delivered.message["Received"])
    assert delivered.message.get_content() == "Hello from the smoke test.\n"
    assert delivered.raw.endswith(b"\n\nHello from the smoke test.\n")

    instance.stop()
    assert not instance.is_running()
    assert instance.processes() == []
    assert "status=sent" in instance.log_text()


def test_refuses_other_domains(postfix_factory: PostfixFactory) -> None:
    instance = postfix_factory()
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(instance, ["someone@elsewhere.invalid"])


def test_two_instances_run_side_by_side(postfix_factory: PostfixFactory) -> None:
    first, second = postfix_factory(), postfix_factory()
    assert first.smtp_port != second.smtp_port
    send(first)
    send(second, ["dave@example.com"])
    assert [d.recipients for d in second.wait_for_delivery(1)] == [("dave@example.com",)]
    assert len(first.wait_for_delivery(1)) == 1


def test_hold_queue_is_visible(postfix_factory: PostfixFactory) -> None:
    # A header_checks HOLD puts the message on hold, as a milter's quarantine does.
    instance = postfix_factory(extra_config={"header_checks": "static:HOLD"})
    send(instance)
    [queue_id] = instance.wait_for_held(1)
    assert f"{queue_id}: hold:" in instance.log_text()
    assert "Subject: smoke test" in instance.postcat(queue_id)
    assert instance.delivered() == []


class MiniMilter:
    """The smallest milter Postfix accepts: says "continue" to everything, adds a header.

    Wire format (libmilter/mfdef.h): 4-byte big-endian length, command byte, data.
    """

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.listener.settimeout(0.1)
        self.commands: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                self._serve(conn)

    @staticmethod
    def _recv(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError("MTA closed the connection")
            data += chunk
        return data

    @staticmethod
    def _send(conn: socket.socket, command: bytes, data: bytes = b"") -> None:
        conn.sendall(struct.pack("!I", len(command) + len(data)) + command + data)

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                (length,) = struct.unpack("!I", self._recv(conn, 4))
                packet = self._recv(conn, length)
                command = packet[:1]
                self.commands.append(command)
                if command == b"O":  # version 6, SMFIF_ADDHDRS, every stage with replies
                    self._send(conn, b"O", struct.pack("!III", 6, 0x01, 0))
                elif command in (b"D", b"A"):  # macros, abort: no reply
                    pass
                elif command == b"Q":
                    return
                elif command == b"E":
                    self._send(conn, b"h", b"X-Smoke\0yes\0")
                    self._send(conn, b"c")
                else:
                    self._send(conn, b"c")
        except ConnectionError:
            return


@pytest.fixture(params=["unix", "inet"])
def mini_milter(
    request: pytest.FixtureRequest, milter_socket_dir: Path
) -> Iterator[tuple[str, MiniMilter]]:
    if request.param == "unix":
        path = milter_socket_dir / "smoke.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        grant_postfix_access(path)
        spec = f"unix:{path}"
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        spec = f"inet:127.0.0.1:{listener.getsockname()[1]}"
    listener.listen(8)
    milter = MiniMilter(listener)
    yield spec, milter
    milter.close()


def test_milter_socket_is_reachable(
    postfix_factory: PostfixFactory, mini_milter: tuple[str, MiniMilter]
) -> None:
    spec, milter = mini_milter
    instance = postfix_factory(spec)
    send(instance)
    [delivered] = instance.wait_for_delivery(1)
    assert delivered.message["X-Smoke"] == "yes"
    assert {b"O", b"C", b"M", b"R", b"E"} <= set(milter.commands)
