"""`--metrics`: /metrics and /healthz of a real milter process after known conversations."""

from __future__ import annotations

import http.client
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pymilterkit import Status
from pymilterkit.testing import MilterClient, MilterProcess
from tests.helpers import worker_pids

ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests.integration.ops_filters:Verdicts"
MESSAGE = b"From: a@example.net\r\nSubject: hello\r\n\r\nHello.\r\n"
pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def endpoint(milter: MilterProcess, timeout: float = 10.0) -> tuple[str, int]:
    """The metrics address the milter logged (it was started on port 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"metrics on http://([\d.]+):(\d+)/metrics", milter.log())
        if found:
            return found[1], int(found[2])
        time.sleep(0.05)
    raise AssertionError(f"no metrics address in the log:\n{milter.log()}")


def get(address: tuple[str, int], path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def scrape(address: tuple[str, int]) -> Samples:
    status, text = get(address, "/metrics")
    assert status == 200, text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settled(address: tuple[str, int], sessions: int) -> Samples:
    """A scrape once `sessions` sessions were served and all are closed."""
    result: Samples = {}

    def done() -> bool:
        nonlocal result
        result = scrape(address)
        return (
            value(result, "pymilterkit_sessions_total") == sessions
            and value(result, "pymilterkit_sessions_active") == 0
        )

    wait_until(done, f"{sessions} closed sessions")
    return result


def test_exact_counts_after_a_known_conversation() -> None:
    with MilterProcess(TARGET, args=["--metrics", "127.0.0.1:0"], cwd=ROOT) as milter:
        address = endpoint(milter)
        assert get(address, "/healthz") == (200, "serving\n")
        client = MilterClient(milter.socket)
        first = client.run(MESSAGE, recipients=["ok1@example.org", "ok2@example.org",
                                                "reject@example.org"])
        assert [r.status for r in first.recipients] == [Status.CONTINUE] * 2 + [Status.REJECT]
        assert first.status == Status.CONTINUE
        second = client.run(MESSAGE, recipients=["ok@example.org", "boom@example.org"])
        assert [r.status for r in second.recipients] == [Status.CONTINUE, Status.TEMPFAIL]
        third = client.run(MESSAGE, sender="spam@example.net", recipients=["ok@example.org"])
        assert third.status == Status.REJECT
        assert [h.value for h in first.headers_added if h.name == "X-Prometheus"] == ["loaded"]

        samples = settled(address, 3)
        assert value(samples, "pymilterkit_stage_calls_total", stage="mail") == 3
        assert value(samples, "pymilterkit_stage_calls_total", stage="rcpt") == 6
        assert value(samples, "pymilterkit_stage_calls_total", stage="eom") == 3
        rcpt = {
            status: value(samples, "pymilterkit_stage_results_total", stage="rcpt", status=status)
            for status in ("continue", "reject", "tempfail", "accept", "discard")
        }
        assert rcpt == {"continue": 4, "reject": 1, "tempfail": 1, "accept": 0, "discard": 0}
        assert value(samples, "pymilterkit_stage_results_total", stage="eom",
                     status="reject") == 1
        assert value(samples, "pymilterkit_stage_errors_total", stage="rcpt") == 1
        assert value(samples, "pymilterkit_stage_errors_total", stage="eom") == 0
        assert value(samples, "pymilterkit_stage_timeouts_total", stage="rcpt") == 0
        assert value(samples, "pymilterkit_stage_duration_seconds_count", stage="rcpt") == 6
        assert value(samples, "pymilterkit_stage_duration_seconds_bucket", stage="rcpt",
                     le="+Inf") == 6
        assert value(samples, "pymilterkit_stage_duration_seconds_sum", stage="rcpt") > 0
        assert value(samples, "pymilterkit_actions_total", action="add_header") == 9
        assert value(samples, "pymilterkit_actions_total", action="change_header") == 3
        assert value(samples, "pymilterkit_actions_total", action="set_reply") == 1
        assert value(samples, "pymilterkit_workers_alive") == 1
        assert value(samples, "pymilterkit_worker_restarts_total") == 0
        # Stages the filter does not register are not reported.
        assert ("pymilterkit_stage_calls_total", frozenset({("stage", "helo")})) not in samples
        assert get(address, "/nothing")[0] == 404

        # The drain hook: 503 from then on.
        client.run(MESSAGE, recipients=["drain@example.org"])
        assert get(address, "/healthz") == (503, "draining\n")
        assert value(scrape(address), "pymilterkit_up") == 0


def test_prometheus_client_is_not_imported_without_metrics() -> None:
    with MilterProcess(TARGET, cwd=ROOT) as milter:
        result = MilterClient(milter.socket).run(MESSAGE)
        assert [h.value for h in result.headers_added if h.name == "X-Prometheus"] == ["absent"]
        assert "metrics on" not in milter.log()


def test_workers_counts_survive_a_killed_worker_and_restarts_are_counted() -> None:
    args = ["--workers", "2", "--metrics", "127.0.0.1:0"]
    with MilterProcess(TARGET, args=args, cwd=ROOT) as milter:
        address = endpoint(milter)
        pids = worker_pids(milter.pid, 2)
        wait_until(lambda: value(scrape(address), "pymilterkit_workers_alive") == 2, "2 workers")
        client = MilterClient(milter.socket)
        served: list[int] = []
        for _ in range(6):
            result = client.run(MESSAGE, recipients=["a@example.org", "b@example.org"])
            served += [int(h.value) for h in result.headers_added if h.name == "X-Worker"]
        assert set(served) <= set(pids)
        before = settled(address, 6)
        assert value(before, "pymilterkit_stage_calls_total", stage="rcpt") == 12
        assert get(address, "/healthz") == (200, "serving\n")

        victim = served[0]  # a worker that has counted something
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: value(scrape(address), "pymilterkit_worker_restarts_total") == 1
            and value(scrape(address), "pymilterkit_workers_alive") == 2,
            "the killed worker replaced",
        )
        after = scrape(address)
        for name, labels in [
            ("pymilterkit_sessions_total", {}),
            ("pymilterkit_stage_calls_total", {"stage": "rcpt"}),
            ("pymilterkit_stage_results_total", {"stage": "rcpt", "status": "continue"}),
            ("pymilterkit_stage_duration_seconds_count", {"stage": "eom"}),
            ("pymilterkit_actions_total", {"action": "add_header"}),
        ]:
            assert value(after, name, **labels) == value(before, name, **labels), name
        assert value(after, "pymilterkit_sessions_active") == 0
        assert get(address, "/healthz") == (200, "serving\n")

        for _ in range(2):
            client.run(MESSAGE, recipients=["c@example.org"])
        final = settled(address, 8)
        assert value(final, "pymilterkit_stage_calls_total", stage="rcpt") == 14
        assert value(final, "pymilterkit_actions_total", action="add_header") == 8 * 3


def test_async_stages_are_counted_and_timeouts_too() -> None:
    args = ["--metrics", "127.0.0.1:0", "--stage-timeout", "0.3"]
    with MilterProcess("tests.integration.async_filters:Deadline", args=args, cwd=ROOT) as milter:
        address = endpoint(milter)
        result = MilterClient(milter.socket).run(
            MESSAGE, recipients=["fast@example.org", "slow@example.org"]
        )
        assert [r.status for r in result.recipients] == [Status.CONTINUE, Status.TEMPFAIL]
        samples = settled(address, 1)
        assert value(samples, "pymilterkit_stage_timeouts_total", stage="rcpt") == 1
        assert value(samples, "pymilterkit_stage_results_total", stage="rcpt",
                     status="continue") == 1
        assert value(samples, "pymilterkit_stage_results_total", stage="rcpt",
                     status="tempfail") == 1
        assert value(samples, "pymilterkit_stage_duration_seconds_bucket", stage="rcpt",
                     le="0.25") == 1  # only the fast one: the other ran to the deadline
        assert value(samples, "pymilterkit_stage_calls_total", stage="eom") == 1


def test_async_verdicts_in_dry_run_are_counted_not_sent() -> None:
    args = ["--metrics", "127.0.0.1:0", "--dry-run"]
    with MilterProcess("tests.integration.async_filters:AsyncRcpt", args=args, cwd=ROOT) as milter:
        address = endpoint(milter)
        result = MilterClient(milter.socket).run(
            MESSAGE, recipients=["bad@example.org", "ok@example.org"]
        )
        assert [r.status for r in result.recipients] == [Status.CONTINUE, Status.CONTINUE]
        assert result.modifications == ()
        samples = settled(address, 1)
        assert value(samples, "pymilterkit_dry_run_verdicts_total", stage="rcpt",
                     status="reject") == 1
        assert value(samples, "pymilterkit_stage_results_total", stage="rcpt",
                     status="continue") == 2
        assert value(samples, "pymilterkit_dry_run_actions_total", action="add_header") == 2
        assert value(samples, "pymilterkit_actions_total", action="add_header") == 0


def test_counts_go_on_across_a_reload() -> None:
    """SIGHUP starts fresh interpreters: they map the supervisor's counts and add to them."""
    args = ["--workers", "2", "--metrics", "127.0.0.1:0"]
    with MilterProcess(TARGET, args=args, cwd=ROOT) as milter:
        address = endpoint(milter)
        old = set(worker_pids(milter.pid, 2))
        client = MilterClient(milter.socket)
        for _ in range(3):
            client.run(MESSAGE, recipients=["a@example.org"])
        settled(address, 3)
        milter.signal(signal.SIGHUP)

        def reloaded() -> bool:
            from tests.helpers import children

            now = children(milter.pid)
            return len(now) == 2 and not now & old

        wait_until(reloaded, "a new generation of workers", timeout=30)
        for _ in range(3):
            result = client.run(MESSAGE, recipients=["a@example.org"])
            assert [h.value for h in result.headers_added if h.name == "X-Rcpt-Count"] == ["1"]
        samples = settled(address, 6)
        assert value(samples, "pymilterkit_stage_calls_total", stage="rcpt") == 6
        assert value(samples, "pymilterkit_actions_total", action="add_header") == 18
        assert value(samples, "pymilterkit_workers_alive") == 2
        assert get(address, "/healthz") == (200, "serving\n")


@pytest.mark.parametrize("handed_over_by", ["reload", "recycling"])
def test_a_single_process_that_handed_over_counts_only_its_worker(handed_over_by: str) -> None:
    """Serving alone, then supervising the fresh worker that took over: one serving process
    alive, and /healthz follows that worker (draining: 503), not the supervisor's old row."""
    args = ["--metrics", "127.0.0.1:0", "--drain-timeout", "10"]
    if handed_over_by == "recycling":
        args += ["--max-sessions-per-worker", "2"]
    with MilterProcess(TARGET, args=args, cwd=ROOT) as milter:
        address = endpoint(milter)
        client = MilterClient(milter.socket)
        if handed_over_by == "reload":
            milter.signal(signal.SIGHUP)
        else:
            for _ in range(2):
                client.run(MESSAGE, recipients=["a@example.org"])
        wait_until(lambda: f"pymilterkit[{milter.pid}] INFO stopped:" in milter.log(),
                   "the supervisor to stop serving", timeout=30)
        wait_until(lambda: value(scrape(address), "pymilterkit_workers_alive") == 1,
                   "one worker alive", timeout=5)
        (worker,) = worker_pids(milter.pid, 1)
        assert get(address, "/healthz") == (200, "serving\n")
        conn = MilterClient(milter.socket, timeout=10).open()
        conn.negotiate()
        conn.connect("idle.example", None)  # an open session: the worker's drain lasts
        os.kill(worker, signal.SIGTERM)  # the worker alone drains; nothing else serves
        wait_until(lambda: get(address, "/healthz") == (503, "draining\n"), "503", timeout=5)
        conn.close()
        milter.signal(signal.SIGTERM)
        assert milter.wait(30) == 0, milter.log()
