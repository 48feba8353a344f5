"""Process names: the role and the filter in /proc/PID/comm, and in a fresh worker's argv."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pymilterkit import MilterError
from pymilterkit.testing import MilterClient, MilterProcess

from ..helpers import children, worker_pids
from .test_metrics import wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_supervisor_and_workers_are_named_and_fresh_workers_say_whose() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", args=["--workers", "2"],
                       cwd=ROOT) as milter:
        workers = worker_pids(milter.pid, 2)
        assert _comm(milter.pid) == "sup RcptCount"
        wait_until(lambda: sorted(_comm(p) for p in workers) == ["w1 RcptCount", "w2 RcptCount"],
                   "the workers' names", timeout=20)
        milter.signal(signal.SIGHUP)  # a reload: fresh interpreters
        wait_until(lambda: "reloaded in" in milter.log(), "the reload", timeout=20)
        fresh = sorted(children(milter.pid) - set(workers))
        assert fresh
        for pid in fresh:
            line = _cmdline(pid)
            assert any(w.startswith("pymilterkit-worker:") for w in line), line
            assert "examples.rcpt_count:RcptCount" in line
        wait_until(lambda: all(_comm(p).endswith(" RcptCount") and _comm(p)[0] == "w"
                               for p in children(milter.pid) & set(fresh)), "fresh names",
                   timeout=20)


def _stop_with_a_session_in_flight(milter: MilterProcess, serving: list[int]) -> None:
    """SIGTERM while a HELO takes 3 s: one of `serving` shows `drain Slow` while it drains."""
    client = MilterClient(milter.socket, timeout=20).open()
    client.negotiate()

    def helo() -> None:
        with contextlib.suppress(OSError, MilterError):
            client.helo("sleep-3")

    thread = threading.Thread(target=helo)
    thread.start()
    try:
        time.sleep(0.5)
        milter.signal(signal.SIGTERM)
        wait_until(lambda: "drain Slow" in map(_name_if_alive, serving), "the drain name",
                   timeout=2.5)
    finally:
        thread.join(10)
        client.close()
    assert milter.wait(20) == 0, milter.log()


def _name_if_alive(pid: int) -> str | None:
    try:
        return _comm(pid)
    except FileNotFoundError:  # it stopped already
        return None


def test_a_draining_process_says_so() -> None:
    with MilterProcess("tests.integration.filters:Slow", cwd=ROOT) as milter:
        _stop_with_a_session_in_flight(milter, [milter.pid])


def test_workers_a_reload_replaces_say_so_when_they_drain() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", args=["--workers", "2"],
                       cwd=ROOT) as milter:
        old = worker_pids(milter.pid, 2)
        milter.signal(signal.SIGHUP)
        wait_until(lambda: not (children(milter.pid) & set(old)), "the old workers to leave",
                   timeout=20)
        log = milter.log()
    for pid in old:
        assert f"pymilterkit[{pid}] INFO a reload replaced this worker: draining" in log, log
        assert f"pymilterkit[{pid}] INFO signal SIGTERM: draining" not in log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop privileges)")
@pytest.mark.parametrize("workers", [1, 2])
def test_processes_that_dropped_privileges_are_named_too(workers: int) -> None:
    """After setuid a process's /proc/self/comm is root's: the names are set with prctl."""
    with MilterProcess("tests.integration.filters:Slow", cwd=ROOT,
                       args=["--user", "nobody", "--workers", str(workers)]) as milter:
        serving = [milter.pid]
        if workers > 1:
            serving = worker_pids(milter.pid, workers)
            wait_until(lambda: sorted(_comm(p) for p in serving) == ["w1 Slow", "w2 Slow"],
                       "the workers' names", timeout=20)
        _stop_with_a_session_in_flight(milter, serving)
