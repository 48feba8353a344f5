"""The metrics HTTP endpoint: `/metrics` (Prometheus text format) and `/healthz`.

The only module that imports `prometheus_client` (the `pymilterkit[metrics]` extra); it is
imported only when a run has `metrics`. It runs in the process that owns the listening socket
(`_metrics.Owner`), on a thread of its own, bound to the one address it was given.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ._errors import ConfigurationError
from ._metrics import (
    BUCKETS,
    STAGE_NAMES,
    MetricsAddress,
    Owner,
    SharedCounts,
    install,
    snapshot,
    stage_label,
)
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

_REQUEST_TIMEOUT = 5.0  # seconds a scraper may take to send its request


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
        calls = CounterMetricFamily(
            "pymilterkit_stage_calls", "Stage callbacks answered, by stage", labels=["stage"]
        )
        results = CounterMetricFamily(
            "pymilterkit_stage_results",
            "Answers sent to the MTA, by stage and status",
            labels=["stage", "status"],
        )
        latency = HistogramMetricFamily(
            "pymilterkit_stage_duration_seconds",
            "Time from libmilter's callback to the answer, by stage",
            labels=["stage"],
        )
        for stage in self.answered:
            figures = stages[stage]
            label = stage_label(stage)
            count = sum(figures["results"].values())
            calls.add_metric([label], count)
            for status, value in figures["results"].items():
                results.add_metric([label, status], value)
            cumulative, running = [], 0.0
            for bound, value in zip((*BUCKETS, float("inf")), figures["buckets"], strict=True):
                running += value
                cumulative.append((_bound(bound), running))
            latency.add_metric([label], cumulative, figures["sum"])
        errors = CounterMetricFamily(
            "pymilterkit_stage_errors",
            "Stage methods that raised or returned no Status (answered error_status)",
            labels=["stage"],
        )
        timeouts = CounterMetricFamily(
            "pymilterkit_stage_timeouts",
            "Stage methods that ran past stage_timeout",
            labels=["stage"],
        )
        for stage in self.all:
            errors.add_metric([stage_label(stage)], stages[stage]["errors"])
            timeouts.add_metric([stage_label(stage)], stages[stage]["timeouts"])
        yield from (calls, results, latency, errors, timeouts)
        yield GaugeMetricFamily(
            "pymilterkit_sessions_active", "MTA connections open now", value=snap["sessions_active"]
        )
        yield CounterMetricFamily(
            "pymilterkit_sessions", "MTA connections served", value=snap["sessions_total"]
        )
        actions = CounterMetricFamily(
            "pymilterkit_actions", "Actions sent to the MTA, by kind", labels=["action"]
        )
        for action, value in snap["actions"].items():
            actions.add_metric([action], value)
        yield actions
        if self.dry_run:
            verdicts = CounterMetricFamily(
                "pymilterkit_dry_run_verdicts",
                "Answers the filter gave but dry-run replaced by CONTINUE",
                labels=["stage", "status"],
            )
            for stage in self.all:
                for status, value in stages[stage]["dry_run"].items():
                    if status not in ("continue", "noreply"):
                        verdicts.add_metric([stage_label(stage), status], value)
            yield verdicts
            dry_actions = CounterMetricFamily(
                "pymilterkit_dry_run_actions",
                "Actions the filter called but dry-run did not send, by kind",
                labels=["action"],
            )
            for action, value in snap["dry_run_actions"].items():
                dry_actions.add_metric([action], value)
            yield dry_actions
        yield GaugeMetricFamily(
            "pymilterkit_workers_alive", "Serving processes alive", value=self.owner.alive
        )
        yield CounterMetricFamily(
            "pymilterkit_worker_restarts",
            "Workers started in place of one that died",
            value=self.owner.restarts,
        )
        healthy, _ = self.owner.healthy()
        yield GaugeMetricFamily(
            "pymilterkit_up", "1 while serving, 0 while draining or with no live worker",
            value=1 if healthy else 0,
        )
        info = GaugeMetricFamily(
            "pymilterkit_build_info", "pymilterkit version", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = _REQUEST_TIMEOUT
    server_version = "pymilterkit"

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(self.server.registry)
            except Exception:
                logger.exception("metrics: could not collect")
                self._answer(500, b"collect failed\n")
                return
            self._answer(200, body, content_type)
        elif path == "/healthz":
            healthy, why = self.server.owner.healthy()
            self._answer(200 if healthy else 503, why.encode() + b"\n")
        else:
            self._answer(404, b"not found: try /metrics or /healthz\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics: %s %s", self.address_string(), format % args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: MetricsAddress, owner: Owner, registry: CollectorRegistry):
        self.owner = owner
        self.registry = registry
        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        super().__init__((address.host, address.port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics: request from %s failed", client_address, exc_info=True)


class MetricsServer:
    """The endpoint's server and thread; `close()` stops it, `forget()` in a forked child."""

    def __init__(self, server: _HTTPServer) -> None:
        self.server = server
        self.thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="pymilterkit-metrics",
            daemon=True,
        )
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)
        self.server.server_close()

    def forget(self) -> None:
        """In a forked child: close this process's copy of the socket; the parent serves."""
        self.server.socket.close()


def serve(
    address: MetricsAddress, owner: Owner, session_class: type[MilterSession], *, dry_run: bool
) -> MetricsServer:
    """Bind `address` and serve `/metrics` and `/healthz` on a thread; logs where."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MilterCollector(owner, session_class, dry_run))
    try:
        httpd = _HTTPServer(address, owner, registry)
    except OSError as exc:
        raise ConfigurationError(f"metrics: cannot listen on {address}: {exc}") from exc
    server = MetricsServer(httpd)
    host, port = server.address
    shown = f"[{host}]" if ":" in host else host
    logger.info("metrics on http://%s:%d/metrics (health: /healthz)", shown, port)
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
