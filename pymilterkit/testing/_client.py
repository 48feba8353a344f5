"""The MTA-side client: speaks the milter protocol (version 6) to a running milter."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from .._errors import MilterTimeout, ProtocolError, SocketSpecError
from .._flags import Actions, ProtocolOpts
from .._socketspec import SocketSpec, parse_socket_spec
from . import _wire as w
from ._conversation import ALL_ACTIONS, ALL_PROTOCOL
from ._driver import MtaDriver
from ._envelope import ClientInfo
from ._results import Step

__all__ = ["MilterClient", "SocketEndpoint", "parse_client_spec"]


def parse_client_spec(spec: str) -> SocketSpec:
    """A milter's socket spec: `unix:/path`, `inet:PORT@HOST`, `inet6:PORT@[::1]`.

    Postfix's `inet:HOST:PORT` is accepted too. Without a host, the loopback address is used.
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind.lower() in ("inet", "inet6") and "@" not in rest and ":" in rest:
        host, _, port = rest.rpartition(":")
        spec = f"{kind}:{port}@{host}"
    parsed = parse_socket_spec(spec)
    if parsed.kind in ("fd", "systemd"):
        raise SocketSpecError(
            f"a client cannot connect to a {parsed.kind} spec; use the socket's unix: or inet: "
            f"address"
        )
    return parsed


class SocketEndpoint:
    """One socket to a milter; every wait is bounded by `timeout` seconds."""

    def __init__(self, spec: str | SocketSpec, timeout: float = 10.0) -> None:
        self.spec = parse_client_spec(spec) if isinstance(spec, str) else spec
        self.timeout = timeout
        self.reader = w.PacketReader()
        family = socket.AF_UNIX if self.spec.kind == "unix" else self.spec.family
        address: str | tuple[Any, ...] = self.spec.connect_address()
        if isinstance(address, tuple):
            infos = socket.getaddrinfo(address[0], address[1], family, socket.SOCK_STREAM)
            address = tuple(infos[0][4])
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except TimeoutError:
            self.sock.close()
            raise MilterTimeout(f"connecting to the milter at {self.spec} timed out") from None
        except OSError as exc:
            self.sock.close()
            raise ProtocolError(f"cannot connect to the milter at {self.spec}: {exc}") from None
        if self.spec.kind != "unix":
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, cmd: bytes, data: bytes, step: Step) -> None:
        try:
            self.sock.sendall(w.encode_packet(cmd, data))
        except TimeoutError:
            raise MilterTimeout(f"sending {step} to the milter timed out") from None
        except OSError as exc:
            raise ProtocolError(
                f"the milter closed the connection before {step} ({exc.strerror or exc})"
            ) from None

    def receive(self, step: Step) -> w.Packet:
        while True:
            try:
                packet = self.reader.next_packet()
            except ProtocolError as exc:
                raise ProtocolError(f"{exc} (in the answer to {step})") from None
            if packet is not None:
                return packet
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise MilterTimeout(
                    f"the milter did not answer {step} within {self.timeout:g} s"
                ) from None
            except OSError as exc:
                raise ProtocolError(
                    f"the milter closed the connection during {step} ({exc.strerror or exc})"
                ) from None
            if not data:
                if self.reader.pending:
                    raise ProtocolError(
                        f"the milter closed the connection in the middle of a packet "
                        f"(answering {step})"
                    )
                raise ProtocolError(f"the milter closed the connection during {step}")
            self.reader.feed(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class MilterClient(MtaDriver):
    """An MTA stand-in for a running milter at `socket` (`unix:`, `inet:`, `inet6:` spec).

    Each `run`/`run_connection` opens a new connection; `open()` gives a `MilterConnection`
    for sending commands one at a time. `timeout` bounds every connect, send and wait.

        client = MilterClient("unix:/run/milter.sock")
        result = client.run(message_bytes, sender="a@example.net", recipients=["b@example.org"])
    """

    def __init__(
        self,
        socket: str,
        *,
        timeout: float = 10.0,
        actions: Actions = ALL_ACTIONS,
        protocol: ProtocolOpts = ALL_PROTOCOL,
        version: int = w.PROTOCOL_VERSION,
        client: ClientInfo | None = None,
    ) -> None:
        super().__init__(actions=actions, protocol=protocol, version=version, client=client)
        self.spec = parse_client_spec(socket)
        self.timeout = timeout

    def _endpoint(self) -> SocketEndpoint:
        return SocketEndpoint(self.spec, self.timeout)
