"""Listening sockets the runner opens itself and hands to libmilter as `fd:N`.

Debian's libmilter accepts an inherited, bound socket as `fd:N` (it only calls listen()).
Opening it here lets the runner set TCP_NODELAY (libmilter sets none, and its end-of-message
writes then wait ~40 ms for the MTA's delayed ACK), create a unix socket with its mode and
group without a race (`_security.bind_unix_socket`), and lets pre-forked workers share one socket.
"""

from __future__ import annotations

import socket

from ._errors import SocketSpecError
from ._security import UnixSocketFile, bind_unix_socket
from ._socketspec import SocketSpec, check_unix_path

__all__ = ["Listener", "open_listener"]


class Listener:
    """A listening socket and, for a unix socket, the file it created."""

    def __init__(self, sock: socket.socket, file: UnixSocketFile | None = None) -> None:
        self.sock = sock
        self.file = file

    def fileno(self) -> int:
        """The descriptor, for libmilter's `fd:N` or a pre-forked worker."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and unlink the unix socket file if it is still ours."""
        self.sock.close()
        if self.file is not None:
            self.file.remove()


def _resolve(spec: SocketSpec) -> tuple[int, tuple[object, ...] | str]:
    host = spec.host.strip("[]")
    family = spec.family
    if not host:
        return family, ("::" if family == socket.AF_INET6 else "0.0.0.0", spec.port)
    try:
        infos = socket.getaddrinfo(host, spec.port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SocketSpecError(f"cannot resolve {host!r} in socket spec {spec}: {exc}") from None
    return family, infos[0][4]


def open_listener(
    spec: SocketSpec,
    backlog: int | None = None,
    mode: int | None = None,
    group: str | int | None = None,
    owner: str | int | None = None,
) -> Listener:
    """Bind and listen on `spec`; inet sockets get SO_REUSEADDR and TCP_NODELAY.

    A unix socket gets `mode` (None: 0o660), `group` and `owner` before it appears at its
    path, and replaces a stale socket there (a live one is refused).
    """
    backlog = backlog or socket.SOMAXCONN
    if spec.kind == "unix":
        check_unix_path(spec)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            file = bind_unix_socket(sock, spec.path, mode, group, owner)
        except OSError as exc:
            sock.close()
            raise SocketSpecError(f"could not listen on {spec}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        try:
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            file.remove()
            raise SocketSpecError(f"could not listen on {spec}: {exc}") from None
        return Listener(sock, file)
    if spec.kind not in ("inet", "inet6"):
        raise SocketSpecError(f"cannot open {spec} here")
    family, address = _resolve(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted sockets on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SocketSpecError(f"could not listen on {spec}: {exc}") from None
    return Listener(sock)

