"""The benchmark suite still runs: `benchmarks/run.py --quick` end to end, zero failures.

A smoke run only (a few seconds): it checks that every milter starts, every reply loadgen
verifies is right, and the table and results file come out. It asserts nothing about speed.
Needs gcc and libmilter-dev (to build the C milter and loadgen) and pymilter (the `pymilter`
extra; skipped, with the reason, where it does not build).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .foreign import require_pymilter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "run.py"


def test_quick_benchmark_run_has_no_failures(tmp_path: Path) -> None:
    if shutil.which("gcc") is None or not Path("/usr/include/libmilter/mfapi.h").exists():
        pytest.fail("the benchmark smoke test needs gcc and libmilter-dev", pytrace=False)
    require_pymilter()  # the suite compares with pymilter
    results = tmp_path / "quick.json"
    command = [sys.executable, str(RUN), "--quick", "--json", str(results),
               "--pymilter-python", sys.executable]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "msg/s" in out and "cpu µs/msg" in out
    assert "0 failure(s), 0 failed run(s)" in out

    data = json.loads(results.read_text())
    milters = {row["milter"] for row in data["summary"]}
    assert milters == {"c", "pymilter", "pymilter-1cpu", "pymilterkit", "pymilterkit-anycpu",
                       "pymilterkit-w2", "pymilterkit-empty-w2"}
    assert {row["conns"] for row in data["summary"]} == {1, 8}
    for row in data["summary"]:
        assert row["failures"] == 0 and row["failed_runs"] == 0, row
        assert row["messages"] > 0, row
    workers = [r for r in data["runs"] if r["milter"].endswith("-w2")]
    assert workers and all(r["milter_processes"] == 3 for r in workers)  # parent + 2 workers
    # The split of connections between workers is sampled mid-run: every connection seen (a
    # readiness probe's connection may still be held by a worker when the sample is taken).
    for r in workers:
        if r["conns"] == 8:
            assert 8 <= sum(r["worker_connections"]) <= 9, r["worker_connections"]
    assert "Pre-forked workers: connections held by each worker" in out
    # The per-callback section: pymilterkit's callbacks cost more than empty ones, and both > 0.
    assert "callback (warm, one thread)" in out
    calls = data["callbacks"]
    assert calls["message_us"] > calls["empty_message_us"] > 0
    [memory] = data["memory"]
    assert memory["short_connection_failures"] == 0
    assert memory["rss_after_1000_kib"] > 0


def test_slow_lookups_runs_both_filters_and_checks_every_answer(tmp_path: Path) -> None:
    # benchmarks/slow_lookups.py with tiny numbers: 4 connections, 2 messages each, 0.1 s
    # lookups. Speed is not asserted; every answer (accept/reject per recipient, X-Accepted)
    # is checked by the script, and every lookup must have reached the server.
    results = tmp_path / "slow.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "slow_lookups.py"), "--connections",
               "4", "--messages", "2", "--sync-messages", "2", "--delay", "0.1", "--cap", "20",
               "--good-interval", "0.05", "--json", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["filter"]: row for row in json.loads(results.read_text())}
    assert set(rows) == {"async", "sync"}
    for row in rows.values():
        assert row["answered"] == row["messages"] == 8 and row["wrong"] == 0, row
        assert row["lookups"] == row["lookups_expected"] == 8, row
        assert row["good_n"] >= 1 and row["good_unanswered"] == 0, row
        assert row["milter_rss_peak_kib"] > 0 and row["exit"] == 0, row


def test_run_compares_async_rcpt_with_sync(tmp_path: Path) -> None:
    # run.py's opt-in async rows beside pymilterkit: never suspending (both reply modes:
    # loadgen verifies X-Rcpt-Count, so a @noreply async RCPT still running at end of message
    # would fail here), suspending once, and awaiting a UDP echo (answered mode only).
    results = tmp_path / "async.json"
    command = [sys.executable, str(RUN), "--quick", "--json", str(results), "--no-memory",
               "--milters", "pymilterkit", "pymilterkit-async", "pymilterkit-suspend",
               "pymilterkit-lookup", "--conns", "8", "--modes", "answered", "noreply",
               "--pymilter-python", sys.executable]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "async def on_rcpt against the sync twin" in done.stdout
    data = json.loads(results.read_text())
    rows = {(r["milter"], r["mode"]): r for r in data["summary"]}
    assert set(rows) == {(m, mode) for m in ("pymilterkit", "pymilterkit-async")
                         for mode in ("answered", "noreply")} | {
        ("pymilterkit-suspend", "answered"), ("pymilterkit-lookup", "answered")}
    for (milter, _), row in rows.items():
        assert row["failures"] == 0 and row["messages"] > 0, row
        if milter != "pymilterkit":
            assert row["x_sync"]["msg_per_s"] > 0, row
    assert "cpu_us_per_suspension" in rows[("pymilterkit-suspend", "answered")]


@pytest.mark.parametrize("kind", ["coroutine", "never", "suspend"])
def test_async_call_counts_what_it_says(kind: str) -> None:
    # benchmarks/async_call.py's measured part, without callgrind: each call is answered
    # CONTINUE (asserted inside), and the coroutine alone never suspends.
    script = ROOT / "benchmarks" / "async_call.py"
    done = subprocess.run([sys.executable, str(script), "--child", kind, "--calls", "300"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
