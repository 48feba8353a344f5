"""A serving process's lifecycle tools: closing libmilter's listener to new connections
(`Gate`), waking it (`ListenerThread`), telling systemd and /healthz, and the memory limit.

libmilter's listener thread polls its listening descriptor for up to 5 s at a time, holding
the lock `smfi_stop` needs. So:

- **Gate.** libmilter listens on a private duplicate of the real socket (`fd:N`); a drain
  replaces it (dup2) by a listening socket nobody can reach, so sessions go on and no new one
  comes. A poll that woke before the swap gets EAGAIN from the gate's accept(), which libmilter
  retries. Workers leave the connection in the shared queue; a single process closes the real
  socket, so new connections are refused at once.
- **Wake.** A signal to the listener thread (`_signals.WAKE_SIGNAL`, no-op handler) ends its
  poll with EINTR: a stop takes milliseconds, needs no connection to the milter's own socket
  and never lands on another worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable

from . import _metrics, _systemd
from ._signals import WAKE_SIGNAL

__all__ = [
    "Gate",
    "ListenerThread",
    "notify_draining",
    "rss_mib",
]

logger = logging.getLogger("pymilterkit")
_SETTLE = 0.25  # s a drain lets libmilter accept the connections already queued

def _unreachable_listener() -> socket.socket:
    """A non-blocking listening unix socket with no name anyone can connect to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            directory = tempfile.mkdtemp(prefix="pymilterkit-gate-")
        except OSError:
            sock.bind("")  # Linux autobind: an abstract name no one is told
        else:
            path = os.path.join(directory, "gate")
            try:
                sock.bind(path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.rmdir(directory)
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Gate:
    """The descriptor libmilter listens on: a duplicate of the real socket, closable to new
    connections (`close`) while libmilter and its sessions go on."""

    def __init__(self, real_fd: int) -> None:
        self._dead = _unreachable_listener()
        self.fd = os.dup(real_fd)
        self.open = True
        self._name = _name(real_fd)

    def accepted(self) -> int:
        """Connections accepted from the real socket and still open in this process, whether
        or not their session began: one accepted just before `close` reaches its negotiate
        only when its thread runs, which on a loaded machine can take a while."""
        if self._name is None:
            return 0
        count = 0
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.fstat(fd).st_mode) and _name(fd, connected=True) == self._name:
                    count += 1
        return count

    def close(self) -> None:
        """Take no new connections from the real socket (libmilter now polls a dead one).

        First libmilter accepts what the kernel has queued, for up to `_SETTLE` s: a connection
        still queued when the real socket closes is reset after its peer saw it accepted
        (HAProxy then cannot send it elsewhere: the message in it gets the MTA's default)."""
        if self.open:
            self.open = False
            waiting = select.poll()
            waiting.register(self.fd, select.POLLIN)
            deadline = time.monotonic() + _SETTLE
            while waiting.poll(0) and time.monotonic() < deadline:
                time.sleep(0.002)
            os.dup2(self._dead.fileno(), self.fd, inheritable=False)
            self._dead.close()

    def discard(self) -> None:
        """Close both descriptors: libmilter never ran on them."""
        self._dead.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def forget(self) -> None:
        """libmilter has closed `fd` at its stop; drop the spare socket."""
        self._dead.close()


def _name(fd: int, connected: bool = False) -> tuple[int, object] | None:
    """The family and local name (the port, for TCP) of socket `fd`; with `connected`, None
    for a listening socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if connected and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        name = sock.getsockname()
        return sock.family, name[1] if isinstance(name, tuple) else name
    except OSError:
        return None
    finally:
        sock.detach()


class ListenerThread:
    """The thread that runs `smfi_main`, and a safe way to end its listener's poll."""

    def __init__(
        self, target: Callable[[], None], attention: threading.Event | None = None
    ) -> None:
        self._target = target
        self._attention = attention
        self._lock = threading.Lock()
        self._running = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="libmilter-main", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        with self._lock:
            self._running = True
        try:
            self._target()
        finally:
            with self._lock:  # no wake() signals a thread that has ended
                self._running = False
            self.done.set()
            if self._attention is not None:
                self._attention.set()

    def wake(self) -> bool:
        """Interrupt the listener's poll (EINTR): libmilter then looks at its stop flag."""
        with self._lock:
            ident = self.thread.ident
            if not self._running or ident is None:
                return False
            signal.pthread_kill(ident, WAKE_SIGNAL)
            return True


def notify_draining(stopping: bool) -> None:
    """Tell whoever reports the milter's state that this process drains: `/healthz` answers
    503 for it; `stopping` (the milter as a whole stops, not a reload or a recycled worker):
    systemd gets `STOPPING=1`. The one place both are told."""
    try:
        _metrics.set_draining()
        if stopping:
            _systemd.notifier().stopping()
    except Exception:  # reporting must not stop a drain
        logger.exception("could not report the drain")


def rss_mib() -> float:
    """This process's resident set size in MiB (Linux /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
