"""The gate a drain closes: it counts the connections accepted from the real socket that are
still open in this process, negotiated or not, so a drain never ends under one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pymilterkit._lifecycle import Gate


def _pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.socket(listener.family, socket.SOCK_STREAM)
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    return client, accepted


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_the_gate_counts_accepted_connections_until_they_close(
    family: str, tmp_path: Path
) -> None:
    if family == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "m.sock"))
    else:
        listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(8)
    other = socket.create_server(("127.0.0.1", 0))  # another listener's connections: not ours
    gate = Gate(listener.fileno())
    try:
        assert gate.accepted() == 0
        client, accepted = _pair(listener)
        stranger, stranger_accepted = _pair(other)
        assert gate.accepted() == 1  # the client's end and the other listener's do not count
        gate.close()  # closed to new connections: those accepted still count
        assert gate.accepted() == 1
        accepted.close()
        assert gate.accepted() == 0
        for sock in (client, stranger, stranger_accepted):
            sock.close()
    finally:
        gate.discard()
        listener.close()
        other.close()
