"""Socket specs: parsing and checking them before libmilter sees them, and the one probe
that connects to a milter socket (`connects`)."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat

from ._errors import SocketSpecError

__all__ = ["SocketSpec", "check_unix_path", "connects", "parse_socket_spec"]

_UNIX_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux


@dataclasses.dataclass(frozen=True)
class SocketSpec:
    """A parsed socket spec: `unix`, `inet`, `inet6`, `fd` or `systemd` with its parts.

    For `systemd`, `path` is the socket's name in LISTEN_FDNAMES ("" for the only one).
    """

    kind: str
    path: str = ""
    port: int = 0
    host: str = ""
    fd: int = -1

    def libmilter(self) -> str:
        """The spec in libmilter's syntax."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        if self.kind == "systemd":
            return f"systemd:{self.path}" if self.path else "systemd"
        host = f"@{self.host}" if self.host else ""
        return f"{self.kind}:{self.port}{host}"

    def __str__(self) -> str:
        return self.libmilter()

    @property
    def family(self) -> int:
        """The address family (AF_UNIX, AF_INET, AF_INET6; AF_UNSPEC for fd)."""
        return {
            "unix": socket.AF_UNIX,
            "inet": socket.AF_INET,
            "inet6": socket.AF_INET6,
        }.get(self.kind, socket.AF_UNSPEC)

    def connect_address(self) -> str | tuple[str, int]:
        """Where a client on this machine connects to reach a milter on this spec."""
        if self.kind == "unix":
            return self.path
        host = self.host.strip("[]")
        if not host:
            host = "::1" if self.kind == "inet6" else "127.0.0.1"
        return (host, self.port)


def _port(text: str, spec: str) -> int:
    if text.isdigit():
        port = int(text)
        if 0 < port < 65536:
            return port
        raise SocketSpecError(f"port {port} out of range 1-65535 in socket spec {spec!r}")
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        hint = ""
        host, colon, number = text.rpartition(":")
        if colon and number.isdigit():
            hint = f"; Postfix writes inet:HOST:PORT, libmilter wants inet:{number}@{host}"
        raise SocketSpecError(
            f"unknown port or service {text!r} in socket spec {spec!r}{hint}"
        ) from None


def parse_socket_spec(spec: str) -> SocketSpec:
    """Parse `unix:/path`, `local:/path`, `/path`, `inet:PORT[@HOST]`, `inet6:PORT[@HOST]`, `fd:N`,
    `systemd` or `systemd:NAME` (socket activation, see `_systemd`).

    Raises SocketSpecError naming what is wrong and the accepted forms.
    """
    forms = "use unix:/path/to/sock, inet:PORT@HOST, inet6:PORT@[::1] or systemd"
    if not isinstance(spec, str) or not spec or "\0" in spec:
        raise SocketSpecError(f"empty or invalid socket spec {spec!r}; {forms}")
    if spec.lower() == "systemd":
        return SocketSpec("systemd")
    kind, sep, rest = spec.partition(":")
    if not sep or kind == "":
        kind, rest = "unix", spec if not sep else rest
    kind = kind.lower()
    if kind in ("unix", "local"):
        if not rest:
            raise SocketSpecError(f"socket spec {spec!r} has no path; {forms}")
        if len(os.fsencode(rest)) > _UNIX_PATH_MAX:
            raise SocketSpecError(
                f"unix socket path is longer than {_UNIX_PATH_MAX} bytes: {rest!r}"
            )
        return SocketSpec("unix", path=rest)
    if kind in ("inet", "inet6"):
        port_text, _, host = rest.partition("@")
        if not port_text:
            raise SocketSpecError(f"socket spec {spec!r} has no port; {forms}")
        port = _port(port_text, spec)
        if host.startswith("[") != host.endswith("]"):
            raise SocketSpecError(f"unbalanced brackets in host of socket spec {spec!r}")
        return SocketSpec(kind, port=port, host=host)
    if kind == "fd":
        if not rest.isdigit():
            raise SocketSpecError(f"fd socket spec needs a descriptor number, got {spec!r}")
        return SocketSpec("fd", fd=int(rest))
    if kind == "systemd":
        if not rest or any(ch in rest for ch in ": \t\n"):
            raise SocketSpecError(
                f"systemd socket spec wants a FileDescriptorName= (no ':' or spaces): {spec!r}"
            )
        return SocketSpec("systemd", path=rest)
    raise SocketSpecError(f"unknown socket type {kind!r} in {spec!r}; {forms}")


def check_unix_path(spec: SocketSpec) -> None:
    """Refuse a unix socket path that cannot work, with a message that says why.

    A stale socket file is fine (libmilter removes it); one that a live process still serves,
    a file that is not a socket, or a missing directory is not.
    """
    path = spec.path
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise SocketSpecError(f"directory {directory!r} for unix socket {path!r} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketSpecError(f"{path!r} exists and is not a socket; remove it or pick another")
    if connects(spec):
        raise SocketSpecError(f"another process is already serving on {path!r}")
    # else stale: nobody listens


def connects(spec: SocketSpec) -> bool:
    """Whether a connection to the milter socket `spec` is accepted now (within 1 s); it is
    closed at once. Also wakes libmilter's listener from its poll (`_serve`)."""
    if spec.kind not in ("unix", "inet", "inet6"):
        return False
    probe = socket.socket(spec.family, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(spec.connect_address())
    except OSError:
        return False
    finally:
        probe.close()
    return True
