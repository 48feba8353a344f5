"""File descriptors (issue 19, item 5): the soft limit is raised, and near it the milter serves.

Each idle MTA connection holds one descriptor in the milter. With the soft limit reached,
libmilter's `accept()` fails with EMFILE and its listener retries at once (one CPU at 100%,
new clients wait in the backlog; see docs/reliability.md and benchmarks/starvation.py).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymilterkit import Status
from pymilterkit.testing import HeaderAdded, MilterClient, MilterProcess

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

MESSAGE = b"Subject: limits\r\n\r\nbody\r\n"


class LimitedMilter(MilterProcess):
    """`MilterProcess` started under `prlimit --nofile=SOFT:HARD`."""

    def __init__(self, target: str, soft: int, hard: int) -> None:
        super().__init__(target, cwd=ROOT)
        self.nofile = f"{soft}:{hard}"

    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}", "--", *super().command()]


def nofile(pid: int) -> tuple[int, int]:
    """The (soft, hard) open files limit of process `pid`, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files line in /proc/{pid}/limits")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def good_message(spec: str) -> None:
    result = MilterClient(spec, timeout=10).run(MESSAGE, recipients=["a@example.com", "b@x.org"])
    assert result.status is Status.CONTINUE
    assert [(m.name, m.value) for m in result.modifications if isinstance(m, HeaderAdded)] == [
        ("X-Rcpt-Count", "2")
    ]


def run_in_limits(soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    """Call raise_nofile_limit() in a fresh interpreter under the given limits."""
    code = (
        "import logging, resource\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from pymilterkit._limits import raise_nofile_limit\n"
        "assert raise_nofile_limit() is None\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    return subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", "--", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=True, cwd=ROOT,
    )


def test_raise_nofile_limit_raises_soft_to_hard_and_logs_it() -> None:
    done = run_in_limits(256, 512)
    assert done.stdout.split() == ["512", "512"]
    assert "INFO open files limit raised 256 -> 512 (the hard limit)" in done.stderr


def test_raise_nofile_limit_at_the_hard_limit_changes_nothing() -> None:
    done = run_in_limits(300, 300)
    assert done.stdout.split() == ["300", "300"]
    assert "INFO open files limit 300 (already the hard limit)" in done.stderr


def test_the_serving_process_runs_at_the_hard_limit() -> None:
    with LimitedMilter("examples.rcpt_count:RcptCount", soft=256, hard=512) as milter:
        limits = nofile(milter.pid)
        log = milter.log()
    assert limits == (512, 512)
    assert "open files limit raised 256 -> 512" in log


def test_a_good_client_is_served_with_240_idle_connections_at_a_256_limit() -> None:
    with LimitedMilter("examples.rcpt_count:RcptCount", soft=256, hard=256) as milter:
        assert nofile(milter.pid) == (256, 256)
        path = milter.socket.split(":", 1)[1]
        idle: list[socket.socket] = []
        try:
            for _ in range(240):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                idle.append(conn)
                conn.connect(path)
            # Accepted and held: the milter's own descriptors plus 240, just under the limit.
            held = 0
            for _ in range(100):
                held = open_fds(milter.pid)
                if held >= 240:
                    break
                time.sleep(0.05)
            assert 240 <= held < 256, held
            for _ in range(3):  # each good connection gets a descriptor and gives it back
                good_message(milter.socket)
        finally:
            for conn in idle:
                conn.close()
        assert milter.process is not None and milter.process.poll() is None
        log = milter.log()
    assert re.search(r"Traceback|CRITICAL|giving up", log) is None, log
