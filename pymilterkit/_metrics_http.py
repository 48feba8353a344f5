"""The metrics HTTP endpoint: `/metrics` (Prometheus text format) and `/healthz`.

The only module that imports `prometheus_client` (the `pymilterkit[metrics]` extra); it is
imported only when a run has `metrics`. It runs in the process that owns the listening socket
(`_metrics.Owner`), on a thread of its own, bound to the one address it was given.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from ._errors import ConfigurationError
from ._metrics import (
    BUCKETS,
    STAGE_NAMES,
    Owner,
    SharedCounts,
    install,
    snapshot,
    stage_label,
)
from ._options import MetricsAddress
from ._session import MilterSession
from ._version import __version__

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigurationError(
        "metrics need prometheus_client: pip install 'pymilterkit[metrics]'"
    ) from exc

__all__ = ["MetricsServer", "serve", "start"]

logger = logging.getLogger("pymilterkit")


class MilterCollector(Collector):
    """Reads the shared map (summed over workers) into metric families at each scrape."""

    def __init__(self, owner: Owner, session_class: type[MilterSession], dry_run: bool) -> None:
        self.owner = owner
        spec = session_class.negotiation()
        # Stages this filter registers (their callbacks are counted and timed); errors and
        # timeouts also for negotiate, abort and close.
        self.answered = [s for s in STAGE_NAMES[:-3] if s in spec.stages]
        self.all = [*self.answered, *(s for s in STAGE_NAMES[-3:])]
        self.dry_run = dry_run

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self.owner.shared)
        stages = snap["stages"]
        latency = HistogramMetricFamily(
            "pymilterkit_stage_duration_seconds",
            "Time from libmilter's callback to the answer, by stage", labels=["stage"],
        )
        for stage in self.answered:
            running, cumulative, buckets = 0.0, [], stages[stage]["buckets"]
            for bound, value in zip((*BUCKETS, float("inf")), buckets, strict=True):
                running += value
                cumulative.append((_bound(bound), running))
            latency.add_metric([stage_label(stage)], cumulative, stages[stage]["sum"])
        yield _counter("stage_calls", "Stage callbacks answered, by stage", ["stage"], (
            ([stage_label(s)], sum(stages[s]["results"].values())) for s in self.answered))
        yield _counter("stage_results", "Answers sent to the MTA, by stage and status",
                       ["stage", "status"], (([stage_label(s), status], value)
                                             for s in self.answered
                                             for status, value in stages[s]["results"].items()))
        yield latency
        yield _counter(
            "stage_errors", "Stage methods that raised or returned no Status (answered "
            "error_status)", ["stage"], (([stage_label(s)], stages[s]["errors"]) for s in self.all))
        yield _counter("stage_timeouts", "Stage methods that ran past stage_timeout", ["stage"],
                       (([stage_label(s)], stages[s]["timeouts"]) for s in self.all))
        yield GaugeMetricFamily(
            "pymilterkit_sessions_active", "MTA connections open now", value=snap["sessions_active"]
        )
        yield CounterMetricFamily(
            "pymilterkit_sessions", "MTA connections served", value=snap["sessions_total"]
        )
        yield CounterMetricFamily(
            "pymilterkit_messages_too_big", "Messages past max_message_size: not given to "
            "on_message", value=snap["too_big"]
        )
        yield _counter("actions", "Actions sent to the MTA, by kind", ["action"],
                       (([a], value) for a, value in snap["actions"].items()))
        if self.dry_run:
            yield _counter(
                "dry_run_verdicts", "Answers the filter gave but dry-run replaced by CONTINUE",
                ["stage", "status"], (([stage_label(s), status], value) for s in self.all
                                      for status, value in stages[s]["dry_run"].items()
                                      if status not in ("continue", "noreply")))
            yield _counter(
                "dry_run_actions", "Actions the filter called but dry-run did not send, by kind",
                ["action"], (([a], value) for a, value in snap["dry_run_actions"].items()))
        yield GaugeMetricFamily(
            "pymilterkit_workers_alive", "Serving processes alive", value=self.owner.alive
        )
        yield CounterMetricFamily(
            "pymilterkit_event_loop_restarts",
            "Event loops run again after a stage stopped them (or they failed)",
            value=snap["loop_restarts"],
        )
        yield CounterMetricFamily(
            "pymilterkit_worker_restarts", "Workers started in place of one that died",
            value=self.owner.restarts,
        )
        healthy, _ = self.owner.healthy()
        yield GaugeMetricFamily(
            "pymilterkit_up",
            "1 while serving, 0 while draining, with no live worker or an event loop down",
            value=1 if healthy else 0,
        )
        yield _counter("build_info", "pymilterkit version", ["version"], [([__version__], 1)],
                       GaugeMetricFamily)


def _counter(
    name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]],
    kind: type[CounterMetricFamily | GaugeMetricFamily] = CounterMetricFamily,
) -> Metric:
    """A labelled family `pymilterkit_<name>` with one sample per row."""
    family = kind(f"pymilterkit_{name}", doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


MAX_CONNECTIONS = 1024
"""Connections open at once, at most. Never more than a quarter of the open-files limit
(`connection_cap`), so mail keeps the rest. At the cap, a new connection whose request is
already there is answered at once; any other is answered 503 and closed at once."""
MAX_REQUEST = 8 * 1024
"""Bytes of request line and headers; a bigger request is answered 431 and closed."""
REQUEST_DEADLINE = 3.0
"""Seconds from accept to the last byte of the answer; then the connection is closed."""
BACKLOG = 1024
"""The listen queue: a burst of scrapers waits there, in the kernel, not in this process."""

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


class _Connection:
    """One scraper's connection: its request bytes so far, its answer, its deadline."""

    __slots__ = ("deadline", "reply", "request", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.request = bytearray()
        self.reply: memoryview | None = None


class MetricsServer:
    """The endpoint: one thread serving `/metrics` and `/healthz`, with every resource bounded.

    Not a thread per connection: slow or huge requests would each hold a thread, a descriptor
    and memory that mail needs. One thread multiplexes (`selectors`) at most `connection_cap()`
    connections, each for at most `MAX_REQUEST` bytes and `REQUEST_DEADLINE` seconds.
    """

    def __init__(self, address: MetricsAddress, owner: Owner, registry: CollectorRegistry):
        self.owner = owner
        self.registry = registry
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.sock = socket.create_server(
            (address.host, address.port), family=family, backlog=BACKLOG
        )
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._waiting: dict[socket.socket, _Connection] = {}
        self.cap = connection_cap()
        self._paused_until = 0.0
        self._warned_full = False
        self.thread = threading.Thread(target=self._run, name="pymilterkit-metrics", daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving and close every connection and the listening socket."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self.thread.join(5)
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    def forget(self) -> None:
        """In a forked child: close this process's copies; the parent goes on serving."""
        for sock in (self.sock, self._wake_r, self._wake_w, *self._waiting):
            sock.close()
        self._selector.close()

    # -- the serving thread -----------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        selector.register(self.sock, selectors.EVENT_READ, "listen")
        selector.register(self._wake_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                now = time.monotonic()
                if self._paused_until and now >= self._paused_until:
                    self._paused_until = 0.0
                    selector.register(self.sock, selectors.EVENT_READ, "listen")
                deadlines = [c.deadline for c in self._waiting.values()]
                if self._paused_until:
                    deadlines.append(self._paused_until)
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                for key, _ in selector.select(timeout):
                    if key.data == "stop":
                        return
                    if key.data == "listen":
                        self._accept()
                    else:
                        self._step(key.data)
                now = time.monotonic()
                for conn in [c for c in self._waiting.values() if c.deadline <= now]:
                    logger.debug("metrics: %s too slow; closed", _peer(conn.sock))
                    self._drop(conn)
        except Exception:  # pragma: no cover - a bug here must not kill the milter
            logger.exception("metrics: the endpoint stopped")
        finally:
            for conn in list(self._waiting.values()):
                self._drop(conn)
            selector.close()

    def _pause(self, seconds: float) -> None:
        """Stop accepting for `seconds` (no descriptor left): new ones wait in the listen queue."""
        self._selector.unregister(self.sock)
        self._paused_until = time.monotonic() + seconds

    def _accept(self) -> None:
        for _ in range(64):  # then let the waiting connections have a turn
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE/ENFILE: pause instead of spinning on the queue
                if not self._warned_full:
                    logger.warning("metrics: cannot accept (%s); pausing the endpoint", exc)
                    self._warned_full = True
                self._pause(0.5)
                return
            self._warned_full = False
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + REQUEST_DEADLINE)
            if not self._read(conn):
                sock.close()
                continue
            answered = conn.reply is not None
            if answered and not self._write(conn):
                sock.close()  # answered in full at once: no slot taken
                continue
            if len(self._waiting) >= self.cap:  # full: refused at once, no slot
                if not answered:  # (an answer too big to go out at once is cut)
                    with contextlib.suppress(OSError):  # one try
                        sock.send(_FULL)
                sock.close()
                continue
            self._waiting[sock] = conn
            event = selectors.EVENT_WRITE if answered else selectors.EVENT_READ
            self._selector.register(sock, event, conn)

    def _step(self, conn: _Connection) -> None:
        if conn.reply is None:
            if not self._read(conn):
                self._drop(conn)
            elif conn.reply is not None:
                if self._write(conn):
                    self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
                else:
                    self._drop(conn)
        elif not self._write(conn):
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        if self._waiting.pop(conn.sock, None) is not None:
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _read(self, conn: _Connection) -> bool:
        """Read what is there; False if the connection is finished (closed or failed)."""
        while conn.reply is None:
            try:
                data = conn.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            conn.request += data
            end = conn.request.find(b"\r\n\r\n")
            if end + 4 > MAX_REQUEST or (end < 0 and len(conn.request) > MAX_REQUEST):
                # the head's own size: a read may bring more than the limit at once
                conn.reply = memoryview(_response(431, b"request too large\n", head=False))
            elif end >= 0:
                conn.reply = memoryview(self._answer(bytes(conn.request[: end + 4])))
        return True

    def _write(self, conn: _Connection) -> bool:
        """Send what the socket takes; True while some of the answer is left to send."""
        assert conn.reply is not None
        try:
            sent = conn.sock.send(conn.reply)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        conn.reply = conn.reply[sent:]
        return len(conn.reply) > 0

    def _answer(self, request: bytes) -> bytes:
        line, _, rest = request.partition(b"\r\n")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, b"bad request\n", head=False)
        method, target = parts[0], parts[1].decode("latin-1").partition("?")[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET and HEAD\n", head=False)
        head = method == b"HEAD"
        try:
            headers = http.client.parse_headers(io.BytesIO(rest))
        except (http.client.HTTPException, ValueError):
            return _response(400, b"bad headers\n", head=False)
        if target == "/metrics":
            encoder, content_type = choose_encoder(headers.get("Accept", ""))
            try:
                body = encoder(self.registry)
            except Exception:
                logger.exception("metrics: could not collect")
                return _response(500, b"collect failed\n", head=head)
            return _response(200, body, content_type, head=head)
        if target == "/healthz":
            healthy, why = self.owner.healthy()
            return _response(200 if healthy else 503, why.encode() + b"\n", head=head)
        return _response(404, b"not found: try /metrics or /healthz\n", head=head)


def connection_cap() -> int:
    """`MAX_CONNECTIONS`, or a quarter of this process's open-files limit if that is less."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 4))


def _response(code: int, body: bytes, content_type: str = "text/plain", *, head: bool) -> bytes:
    status = f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
    fields = (
        f"Server: pymilterkit\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return (status + fields).encode("latin-1") + (b"" if head else body)


_FULL = _response(503, b"busy: the endpoint is at its connection cap\n", head=False)


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[:2])
    except OSError:
        return "a client"


def serve(
    address: MetricsAddress, owner: Owner, session_class: type[MilterSession], *, dry_run: bool
) -> MetricsServer:
    """Bind `address` and serve `/metrics` and `/healthz` on a thread; logs where."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MilterCollector(owner, session_class, dry_run))
    try:
        server = MetricsServer(address, owner, registry)
    except OSError as exc:
        raise ConfigurationError(f"metrics: cannot listen on {address}: {exc}") from exc
    host, port = server.address
    shown = f"[{host}]" if ":" in host else host
    logger.info(
        "metrics on http://%s:%d/metrics (health: /healthz; at most %d connections at once)",
        shown, port, server.cap,
    )
    return server


def start(
    address: MetricsAddress,
    session_class: type[MilterSession],
    workers: int,
    *,
    dry_run: bool = False,
) -> Callable[[], None]:
    """In the owner, before forking: the shared map and the HTTP endpoint; returns the stop."""
    # Rows for every worker, and as many again for reloads that overlap old and new ones.
    shared = SharedCounts(rows=max(2 * workers + 2, 4))
    owner = Owner(shared)
    try:
        owner.server = serve(address, owner, session_class, dry_run=dry_run)
    except BaseException:
        shared.close()
        raise
    uninstall = install(owner)
    if workers == 1:  # this process serves: its own row
        owner.rows[owner.pid] = 0

    def stop() -> None:
        owner.server.close()
        uninstall()
        shared.close()

    return stop
