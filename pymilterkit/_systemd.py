"""systemd integration, standard library only: socket activation and sd_notify.

Socket activation (`--socket systemd`, `systemd:NAME`): `take_listener` checks `LISTEN_FDS`,
`LISTEN_PID` and `LISTEN_FDNAMES` (sd_listen_fds(3)) are meant for this process, picks the
socket, checks it is a listening stream socket and unsets the variables so a child does not
take them. The socket is systemd's: nothing here unlinks it.

sd_notify (`NOTIFY_SOCKET`): `Notifier` sends `READY=1`, `STATUS=`, `RELOADING=1`, `STOPPING=1`
and `WATCHDOG=1`. Only the process systemd started talks to it: workers write their session
counts into a shared board the supervisor sums. Pings come from the runner's loops (`tick`),
the ones that prove the milter alive, not from a thread of their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Collection, MutableMapping

from ._board import Board
from ._errors import SocketSpecError
from ._listen import Listener
from ._socketspec import SocketSpec

__all__ = ["Notifier", "notifier", "take_listener"]

logger = logging.getLogger("pymilterkit")

LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_WIDTH = 3  # a worker's cells on the board: serving (0/1), sessions open, sessions served

# -- socket activation ------------------------------------------------------------------------


def _refuse(why: str) -> SocketSpecError:
    return SocketSpecError(
        f"--socket systemd: {why}; start the milter from a .socket unit (see "
        f"docs/guides/deployment.md) or with systemd-socket-activate"
    )


def passed_fds(environ: MutableMapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The sockets systemd passed to process `pid`: `(fd, name)` pairs, as sd_listen_fds(3).

    Refuses (SocketSpecError) when there are none or they are meant for another process.
    """
    listen_pid = environ.get("LISTEN_PID")
    listen_fds = environ.get("LISTEN_FDS")
    if listen_pid is None or listen_fds is None:
        missing = " and ".join(v for v in ("LISTEN_FDS", "LISTEN_PID") if v not in environ)
        raise _refuse(f"no socket was passed ({missing} not set)")
    if not listen_pid.isdigit():
        raise _refuse(f"LISTEN_PID={listen_pid!r} is not a process id")
    if int(listen_pid) != pid:
        raise _refuse(
            f"LISTEN_PID={listen_pid} is not this process ({pid}): the sockets were passed to "
            f"another process"
        )
    if not listen_fds.isdigit() or int(listen_fds) == 0:
        raise _refuse(f"LISTEN_FDS={listen_fds!r}: no socket was passed")
    count = int(listen_fds)
    names = environ.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in environ else []
    if len(names) != count:
        names = ["unknown"] * count  # what sd_listen_fds_with_names(3) reports without names
    return [(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def _choose(fds: list[tuple[int, str]], name: str) -> int:
    listed = ", ".join(f"{n} (fd {fd})" for fd, n in fds)
    if not name:
        if len(fds) > 1:
            raise _refuse(
                f"systemd passed {len(fds)} sockets: {listed}; say which with "
                f"--socket systemd:NAME (FileDescriptorName= in the .socket unit)"
            )
        return fds[0][0]
    chosen = [fd for fd, n in fds if n == name]
    if len(chosen) != 1:
        how = "no socket" if not chosen else f"{len(chosen)} sockets"
        raise _refuse(f"{how} named {name!r} among the passed ones: {listed}")
    return chosen[0]


def _check_listening(fd: int) -> socket.socket:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _refuse(f"descriptor {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise _refuse(f"descriptor {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    problem = ""
    if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        problem = f"descriptor {fd} is a {sock.family.name} socket, not unix, IPv4 or IPv6"
    elif sock.type != socket.SOCK_STREAM:
        problem = (
            f"descriptor {fd} is a {sock.type.name} socket; milters need a stream socket "
            f"(ListenStream=, not ListenDatagram= or ListenSequentialPacket=)"
        )
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = f"descriptor {fd} is not listening (Accept=no and ListenStream= in the unit)"
    if problem:
        sock.detach()  # systemd's descriptor: leave it as it was
        raise _refuse(problem)
    return sock


def activated_spec(sock: socket.socket) -> SocketSpec:
    """The unix or inet spec of a passed socket, for the log and for waking its listeners."""
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = address.decode("utf-8", "surrogateescape") if isinstance(address, bytes) else address
        return SocketSpec("unix", path=path)
    host, port = address[0], address[1]
    if host in ("0.0.0.0", "::"):
        host = ""  # all addresses: a local client connects to the loopback address
    elif sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return SocketSpec("inet6" if sock.family == socket.AF_INET6 else "inet", port=port, host=host)


def take_listener(
    spec: SocketSpec, environ: MutableMapping[str, str] | None = None
) -> tuple[Listener, SocketSpec]:
    """The listening socket systemd passed for `spec` (`systemd` or `systemd:NAME`), and its
    address as a unix/inet spec; the LISTEN_* variables are unset (also on refusal).

    A TCP socket gets TCP_NODELAY (as the runner's own sockets; `NoDelay=` in the unit does the
    same). The Listener has no socket file: a systemd socket is never unlinked here.
    """
    env = os.environ if environ is None else environ
    try:
        fds = passed_fds(env, os.getpid())
        fd = _choose(fds, spec.path)
        for other, _ in fds:
            with contextlib.suppress(OSError):  # as sd_listen_fds: not passed further
                os.set_inheritable(other, False)
        sock = _check_listening(fd)
    finally:
        for var in _LISTEN_VARS:
            env.pop(var, None)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    address = activated_spec(sock)
    logger.info("socket from systemd: fd %d, %s", fd, address)
    return Listener(sock), address


# -- sd_notify --------------------------------------------------------------------------------

def write(board: Board, slot: int, open_: int, served: int) -> None:
    """Worker `slot`'s counts on the board (a slot beyond it is not counted)."""
    if 0 <= slot < board.rows:
        base = board.row(slot)
        board.cells[base], board.cells[base + 1], board.cells[base + 2] = 1, open_, served


def _notify_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """sd_notify(3) for one run; inert without NOTIFY_SOCKET (or in another process).

    `from_environ` takes (and unsets) NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID.
    """

    STATUS_INTERVAL = 1.0
    """Seconds between STATUS= updates at most (sent only when the text changed)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.pid = os.getpid()
        self.watchdog_interval = watchdog_usec / 2e6 if address and watchdog_usec > 0 else 0.0
        self._sock: socket.socket | None = None
        self._board: Board | None = None
        self._ready = False
        self._stopping = False
        self._status = ""
        self._next_status = 0.0
        self._next_ping = 0.0
        self._failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for in the environment (which loses those variables)."""
        env = os.environ if environ is None else environ
        values = {var: env.pop(var, None) for var in _NOTIFY_VARS}
        raw = values["NOTIFY_SOCKET"]
        address = _notify_address(raw) if raw else None
        if raw and address is None:
            logger.warning("NOTIFY_SOCKET=%r is not a path or @name; not notifying systemd", raw)
        usec_text = values["WATCHDOG_USEC"] or ""
        usec = int(usec_text) if usec_text.isdigit() else 0
        watchdog_pid = values["WATCHDOG_PID"]
        if watchdog_pid is not None and watchdog_pid != str(os.getpid()):
            usec = 0  # the watchdog is another process's
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """True in the process systemd started, when it asked for notifications."""
        return self.address is not None and os.getpid() == self.pid

    def send(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields in one datagram; False if not sent (logged once)."""
        if not self.enabled:
            return False
        assert self.address is not None
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                logger.warning("could not notify systemd on %r: %s", self.address, exc)
            return False
        return True

    # -- what the runner calls -------------------------------------------------------------

    def for_workers(self, workers: int) -> None:
        """Before forking `workers` workers: give them a board for their session counts."""
        if self.enabled and self._board is None:
            # Room for a reload's old and new workers side by side; a slot beyond is not
            # counted rather than failing a worker.
            self._board = Board(4 * workers + 4, _WIDTH, name="pymilterkit-systemd")

    def worker_tick(self, slot: int, open_: int, served: int) -> None:
        """In pre-forked worker `slot` (about once a second): publish its session counts."""
        if self._board is not None and os.getpid() != self.pid:
            write(self._board, slot, open_, served)

    def tick(
        self,
        where: str,
        open_: int = 0,
        served: int = 0,
        workers: Collection[int] | None = None,
        stopping: bool = False,
    ) -> None:
        """Called often by the serving loop: READY=1 the first time, STOPPING=1 once
        `stopping`, STATUS= when it changed (at most once a second), WATCHDOG=1 when due.

        `workers`: the slots of a supervisor's live workers, whose counts come from the board.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        if stopping:
            self.stopping()
        serving = 1
        board = self._board
        if workers is not None and board is not None:
            live = [slot for slot in workers if 0 <= slot < board.rows]
            serving, open_, served = (int(board.total(cell, live)) for cell in range(_WIDTH))
        fields: list[str] = []
        if not self._ready and not self._stopping and serving:
            self._ready = True
            fields.append("READY=1")
            logger.debug("told systemd READY=1")
        if now >= self._next_status or fields:
            text = self._status_text(where, open_, served, workers, serving)
            if text != self._status:
                self._status = text
                fields.append(f"STATUS={text}")
            self._next_status = now + self.STATUS_INTERVAL
        if self.watchdog_interval and now >= self._next_ping and (workers is None or workers):
            fields.append("WATCHDOG=1")
            self._next_ping = now + self.watchdog_interval
        if fields:
            self.send(*fields)

    def _status_text(
        self, where: str, open_: int, served: int, workers: Collection[int] | None, serving: int
    ) -> str:
        state = "stopping" if self._stopping else "serving"
        who = "" if workers is None else f", {len(workers)} worker(s) alive ({serving} serving)"
        return f"{state} on {where}{who}; {open_} session(s) open, {served} served"

    def ready(self) -> None:
        """READY=1 (again, after a reload)."""
        if self.send("READY=1", f"STATUS={self._status or 'serving'}"):
            self._ready = True

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC (systemd.service(5), Type=notify-reload)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        """STOPPING=1, once."""
        if not self._stopping and self.enabled:
            self._stopping = True
            self.send("STOPPING=1", "STATUS=stopping")
            logger.debug("told systemd STOPPING=1")

    def close(self) -> None:
        """Close the notification socket and the board (in the process that made them)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._board is not None and os.getpid() == self.pid:
            self._board.close()
            self._board = None


_notifier: Notifier | None = None


def notifier() -> Notifier:
    """The process's notifier, made from (and taking) the environment at the first call."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier.from_environ()
    return _notifier

