"""Listening sockets the runner opens itself and hands to libmilter as `fd:N`.

Debian's libmilter accepts an inherited, bound socket as `fd:N` (it only calls listen()).
Opening it here lets the runner set TCP_NODELAY (libmilter sets none, and its end-of-message
writes then wait ~40 ms for the MTA's delayed ACK), and lets pre-forked workers share one socket.
"""

from __future__ import annotations

import os
import socket

from ._errors import SocketSpecError
from ._security import apply_socket_permissions
from ._socketspec import SocketSpec, check_unix_path

__all__ = ["open_listener", "poke"]


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
) -> socket.socket:
    """Bind and listen on `spec`; inet sockets get SO_REUSEADDR and TCP_NODELAY."""
    backlog = backlog or socket.SOMAXCONN
    if spec.kind == "unix":
        check_unix_path(spec)
        if os.path.exists(spec.path):
            os.unlink(spec.path)  # stale (check_unix_path refused a live one)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(spec.path)
            apply_socket_permissions(spec.path, mode, group)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise SocketSpecError(f"could not listen on {spec}: {exc}") from None
        return sock
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
    return sock


def poke(spec: SocketSpec) -> None:
    """Connect to a milter socket and hang up at once.

    libmilter's listener holds the lock smfi_stop needs while it polls (up to 5 s); a
    connection ends the poll at once, so a stop takes milliseconds instead of seconds.
    """
    if spec.kind == "fd":
        return
    family = socket.AF_UNIX if spec.kind == "unix" else spec.family
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(spec.connect_address())
    except OSError:
        pass
    finally:
        probe.close()
