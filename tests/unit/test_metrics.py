"""Metrics and dry-run without libmilter: addresses, health, rows, and what is off costs nothing."""

from __future__ import annotations

import http.client
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import override

from pymilterkit import (
    ConfigurationError,
    EsmtpParams,
    Milter,
    MilterError,
    MilterSession,
    Status,
    _metrics,
)
from pymilterkit._dispatch import NO_PARAMS, SessionRules
from pymilterkit._metrics_http import start
from pymilterkit._options import parse_address

from ..integration.ops_filters import Verdicts

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9100", "127.0.0.1", 9100),
        ("[::1]:0", "::1", 0),
        ("localhost:80", "localhost", 80),
    ],
)
def test_metrics_addresses(text: str, host: str, port: int) -> None:
    address = parse_address(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text


@pytest.mark.parametrize("text", ["9100", ":9100", "127.0.0.1:", "127.0.0.1:99999", "::1:9100",
                                  "[nothost]:9100", "host:port"])
def test_bad_metrics_addresses_are_refused(text: str) -> None:
    with pytest.raises(ConfigurationError, match="metrics"):
        parse_address(text)


def test_milter_refuses_bad_metrics_and_dry_run_options() -> None:
    with pytest.raises(ConfigurationError, match="HOST:PORT"):
        Milter(Verdicts, "unix:/tmp/unused.sock", metrics="9100")
    with pytest.raises(ConfigurationError, match="dry_run"):
        Milter(Verdicts, "unix:/tmp/unused.sock", dry_run="yes")  # type: ignore[arg-type]


def test_features_that_are_off_leave_the_plain_callbacks() -> None:
    rules = SessionRules(_Stages, Status.TEMPFAIL)
    assert rules.meter is None and rules.dry_run is None
    callback = rules.stage_callback("on_rcpt", {}, lambda key: None)
    assert callback.__qualname__.endswith("_sync_callback.<locals>.callback")


def test_nothing_imports_prometheus_client_without_metrics() -> None:
    code = (
        "import sys, pymilterkit, pymilterkit.__main__, pymilterkit._runner\n"
        "from pymilterkit import Milter\n"
        "from tests.integration.ops_filters import Verdicts\n"
        "Milter(Verdicts, 'unix:/tmp/unused.sock', dry_run=True, workers=2)\n"
        "print(sorted(m for m in sys.modules if 'prometheus' in m or m.endswith('_http')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def health(address: tuple[str, int]) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def supervisor() -> Iterator[tuple[str, int]]:
    """The metrics of a 2-worker supervisor in this process; workers are only simulated."""
    stop = start(parse_address("127.0.0.1:0"), Verdicts, 2)
    owner = _metrics._owner
    assert owner is not None and owner.server is not None
    try:
        yield owner.server.address
    finally:
        stop()


def test_health_follows_workers_and_draining(
    supervisor: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = _metrics._owner
    assert owner is not None
    assert health(supervisor) == (503, "no live worker\n")
    for pid in (1001, 1002):
        _metrics.before_fork()
        _metrics.worker_started(pid)
    assert owner.rows == {1001: 0, 1002: 1}
    assert health(supervisor) == (200, "serving\n")

    # A worker drains (the hook runs in that worker): the other one still serves.
    monkeypatch.setattr(os, "getpid", lambda: 1001)
    monkeypatch.setattr(_metrics, "_row", 0)
    _metrics.set_draining()
    monkeypatch.undo()
    assert health(supervisor) == (200, "serving\n")
    _metrics.worker_exited(1002)
    assert health(supervisor) == (503, "draining\n")
    _metrics.worker_exited(1001)
    assert health(supervisor) == (503, "no live worker\n")

    # A new worker takes a free row (its gauges were zeroed), and is healthy.
    _metrics.before_fork()
    _metrics.worker_started(1003)
    _metrics.worker_restarted()
    assert owner.rows == {1003: 0} and owner.restarts == 1
    assert health(supervisor) == (200, "serving\n")
    # The supervisor drains: the whole milter does.
    _metrics.set_draining()
    assert health(supervisor) == (503, "draining\n")


def test_counts_in_a_reused_row_add_up(supervisor: tuple[str, int]) -> None:
    shared = _metrics._shared
    assert shared is not None
    _metrics.before_fork()
    _metrics.worker_started(2001)
    rec = _metrics.Recorder(shared, 0)
    rec.action("add_header")
    rec.dry_verdict("on_rcpt", 1)
    _metrics.count_timeout("on_eom")  # the supervisor has no recorder of its own: row 0 too
    _metrics.worker_exited(2001)
    _metrics.before_fork()
    _metrics.worker_started(2002)
    again = _metrics.Recorder(shared, 0)
    again.action("add_header")
    snap = _metrics.snapshot(shared)
    assert snap["actions"]["add_header"] == 2
    assert snap["stages"]["on_rcpt"]["dry_run"]["reject"] == 1
    assert snap["stages"]["on_eom"]["timeouts"] == 1


def test_hooks_do_nothing_without_metrics() -> None:
    assert _metrics._shared is None
    _metrics.before_fork()
    _metrics.worker_started(1)
    _metrics.worker_exited(1)
    _metrics.worker_restarted()
    _metrics.set_draining()
    _metrics.count_timeout("on_eom")
    assert _metrics.recorder() is None


def test_a_taken_metrics_port_is_a_configuration_error(supervisor: tuple[str, int]) -> None:
    with pytest.raises(MilterError, match="cannot listen"):
        start(parse_address(f"127.0.0.1:{supervisor[1]}"), Verdicts, 1)


def test_a_fresh_worker_maps_the_supervisors_counts(
    supervisor: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = _metrics._owner
    assert owner is not None
    _metrics.before_fork()
    handed = _metrics.fresh_worker()
    assert handed is not None
    fd_text, row, rows = handed.split(":")
    assert int(fd_text) == owner.shared.fd and os.get_inheritable(owner.shared.fd)
    assert int(rows) == owner.shared.rows
    _metrics.worker_started(3001)
    assert owner.rows == {3001: int(row)}
    # What the fresh interpreter does with its inherited copy of the descriptor.
    monkeypatch.setattr(_metrics, "_shared", None)
    monkeypatch.setattr(_metrics, "_recorder", None)
    _metrics.attach(f"{os.dup(owner.shared.fd)}:{row}:{rows}")
    worker_side = _metrics._shared
    assert worker_side is not None and worker_side is not owner.shared
    _metrics.count_timeout("on_eom")
    worker_side.close()
    assert _metrics.snapshot(owner.shared)["stages"]["on_eom"]["timeouts"] == 1


class _Stages(MilterSession):
    """Answers from the recipient: `reject*` REJECT, `boom*` raises, `odd*` returns no Status."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if recipient.startswith("reject"):
            return Status.REJECT
        if recipient.startswith("boom"):
            raise RuntimeError("boom")
        if recipient.startswith("odd"):
            return "odd"  # type: ignore[return-value]
        return Status.CONTINUE


def test_metered_callbacks_answer_as_the_plain_ones_and_count_every_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shared = _metrics.SharedCounts(rows=1)
    try:
        recorder = _metrics.Recorder(shared, 0)
        plain_rules = SessionRules(_Stages, Status.TEMPFAIL)
        rules = SessionRules(_Stages, Status.TEMPFAIL, meter=_metrics.Meter(recorder))
        session = _Stages()
        rules.attach(session, None)  # type: ignore[arg-type]
        sessions: dict[Any, MilterSession] = {None: session}

        def convert(recipient: str, _: None) -> tuple[str, EsmtpParams]:
            return recipient, NO_PARAMS

        def build(driver: SessionRules) -> Callable[..., int]:
            return driver.stage_callback("on_rcpt", sessions, lambda key: None, convert)

        plain, metered = build(plain_rules), build(rules)
        recipients = ["a", "reject", "b", "boom", "odd", "c"]
        with caplog.at_level(logging.CRITICAL, logger="pymilterkit"):
            answers = [plain(None, r) for r in recipients]
            assert [metered(None, r) for r in recipients] == answers
            del sessions[None]  # no session, none made (a stop): TEMPFAIL, counted too
            assert metered(None, "d") == plain(None, "d")
        assert answers == [Status.CONTINUE, Status.REJECT, Status.CONTINUE, Status.TEMPFAIL,
                           Status.TEMPFAIL, Status.CONTINUE]
        figures = _metrics.snapshot(shared)["stages"]["on_rcpt"]
        assert {k: v for k, v in figures["results"].items() if v} == {
            "continue": 3, "reject": 1, "tempfail": 3,
        }
        assert sum(figures["buckets"]) == 7 and figures["sum"] > 0
        assert figures["errors"] == 2  # the exception and the result that is not a Status
    finally:
        shared.close()


def test_a_fresh_worker_of_another_layout_counts_apart(
    supervisor: tuple[str, int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    owner = _metrics._owner
    assert owner is not None
    # A map of another size: what a supervisor of another pymilterkit version hands over.
    other = os.memfd_create("other-layout", os.MFD_CLOEXEC)
    os.ftruncate(other, 4096)
    monkeypatch.setattr(_metrics, "_shared", None)
    monkeypatch.setattr(_metrics, "_recorder", None)
    with caplog.at_level(logging.WARNING, logger="pymilterkit"):
        _metrics.attach(f"{other}:0:{owner.shared.rows}")
    assert "another layout" in caplog.text
    worker_side = _metrics._shared
    assert worker_side is not None and worker_side is not owner.shared
    _metrics.count_timeout("on_eom")  # counted, in the worker's own map
    assert _metrics.snapshot(worker_side)["stages"]["on_eom"]["timeouts"] == 1
    assert _metrics.snapshot(owner.shared)["stages"]["on_eom"]["timeouts"] == 0
    worker_side.close()
    with pytest.raises(OSError):
        os.fstat(other)  # attach closed the handed descriptor


def test_a_slow_answer_lands_in_its_bucket_and_status() -> None:
    shared = _metrics.SharedCounts(rows=1)
    try:
        recorder = _metrics.Recorder(shared, 0)
        times = iter([10.0, 10.003, 20.0, 20.7])  # 3 ms (bucket le=0.005), then 0.7 s (le=1)
        meter = _metrics.Meter(recorder, clock=lambda: next(times))
        rules = SessionRules(_Stages, Status.TEMPFAIL, meter=meter)
        session = _Stages()
        rules.attach(session, None)  # type: ignore[arg-type]
        callback = rules.stage_callback("on_rcpt", {None: session}, lambda key: None,
                                        lambda r, _: (r, NO_PARAMS))
        assert callback(None, "reject") == Status.REJECT
        assert callback(None, "a") == Status.CONTINUE
        recorder.record("on_eom", Status.REJECT, 0.003)  # an async stage's answer
        stages = _metrics.snapshot(shared)["stages"]
        rcpt, eom = stages["on_rcpt"], stages["on_eom"]
        bounds = list(_metrics.BUCKETS)
        assert rcpt["buckets"][bounds.index(0.005)] == 1
        assert rcpt["buckets"][bounds.index(1.0)] == 1 and sum(rcpt["buckets"]) == 2
        assert {k: v for k, v in rcpt["results"].items() if v} == {"reject": 1, "continue": 1}
        assert rcpt["sum"] == pytest.approx(0.703)
        assert eom["buckets"][bounds.index(0.005)] == 1 and eom["results"]["reject"] == 1
    finally:
        shared.close()
