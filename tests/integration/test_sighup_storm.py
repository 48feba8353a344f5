"""A SIGHUP storm (20 in 2 s to every process of the milter, as `kill -HUP -PGID`,
`systemctl kill -s HUP` or `pkill -HUP` send them) never stops it and loses no session."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pymilterkit import MilterError, Status
from pymilterkit.testing import MilterClient, MilterProcess

from ..helpers import children

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@example.net\r\nSubject: storm\r\n\r\nHello.\r\n"
pytestmark = pytest.mark.integration


def _tree(pid: int) -> set[int]:
    """`pid` and all its descendants: the milter's process group, as far as it goes."""
    found, todo = {pid}, [pid]
    while todo:
        try:
            below = children(todo.pop())
        except OSError:  # it exited meanwhile (an old worker a reload retired)
            continue
        for child in below:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_sighup_storm_under_load_stops_nothing(workers: str) -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", args=["--workers", workers],
                       cwd=ROOT) as milter:
        results: list[Status | str] = []
        done = threading.Event()

        def load() -> None:
            client = MilterClient(milter.socket, timeout=30)
            while not done.is_set():
                try:
                    results.append(client.run(MESSAGE, recipients=["a@example.org"]).status)
                except (OSError, MilterError) as exc:  # a lost session: reported below
                    results.append(repr(exc))

        sender = threading.Thread(target=load)
        sender.start()
        try:
            for _ in range(20):  # 20 in 2 s, to every process, the starting ones included
                for pid in _tree(milter.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)
                time.sleep(0.1)
            time.sleep(3)  # the reloads settle; mail keeps flowing meanwhile
        finally:
            done.set()
            sender.join(60)
        assert milter.process is not None and milter.process.poll() is None, milter.log()
        assert "giving up" not in milter.log()
        lost = [r for r in results if r != Status.CONTINUE]
        assert results and not lost, (lost[:5], milter.log()[-3000:])
        assert MilterClient(milter.socket).run(MESSAGE).status == Status.CONTINUE


_SIGTIMEDWAIT = {"x86_64": 128, "aarch64": 137}  # rt_sigtimedwait, which sigwait() calls


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_thread_of_a_serving_process_waits_for_the_stop_signals(workers: str) -> None:
    # smfi_main's own signal thread sigwait()s for SIGHUP/SIGTERM/SIGINT and stops libmilter
    # at once on the first, abandoning the sessions in flight; the kernel gives it a signal
    # sent to the process whenever the main thread already has one pending (a storm under
    # load). pymilterkit serves without that thread.
    number = _SIGTIMEDWAIT[os.uname().machine]
    with MilterProcess("examples.rcpt_count:RcptCount", args=["--workers", workers],
                       cwd=ROOT) as milter:
        client = MilterClient(milter.socket, timeout=30)
        for _ in range(4):  # every worker is serving
            assert client.run(MESSAGE, recipients=["a@example.org"]).status == Status.CONTINUE
        waiting = []
        for pid in _tree(milter.pid):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    if (task / "syscall").read_text().split()[0] == str(number):
                        waiting.append(f"{pid}/{task.name} {(task / 'comm').read_text().strip()}")
        assert not waiting, waiting
