"""Stops under load keep every session's calls in order (issue 19.6).

Each round starts `stop_filters:Journal` (every call journaled, with its begin and end), keeps it
busy with 4 clients sending messages and 2 connections parked inside a message (libmilter's pool
abandons those at stop, and the runner closes them), then stops it with SIGTERM and
`--drain-timeout 0`, as one process, with `--workers 2` and with metrics (whose stage callback
is compiled separately). Per session, the journal must show:
the first call is on_negotiate (no session is made by a callback after the stop took the
sessions), calls never overlap (each begins after the previous one ended), on_close comes once
and last, and every session that began was closed. The window between a callback's session
look-up and its stage mark is a few bytecodes wide: `tests/unit/test_stop_race.py` holds a
callback inside it; this test checks the whole stop under load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from pymilterkit.testing import MilterClient, MilterConnection, MilterProcess

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
TARGET = "tests.integration.stop_filters:Journal"
MESSAGE = b"Subject: stop\r\n\r\nbody\r\n"
ROUNDS = 6


def _send_until(milter: MilterProcess, stop: threading.Event) -> None:
    client = MilterClient(milter.socket, timeout=10)
    while not stop.is_set():
        with contextlib.suppress(Exception):  # the stop cuts connections off at any point
            client.run_connection([MESSAGE, MESSAGE])


def _parked(milter: MilterProcess) -> MilterConnection:
    connection = MilterClient(milter.socket, timeout=10).open()
    connection.negotiate()
    connection.connect("parked.example", None)
    connection.mail("<parked@example.net>")
    return connection


def _violations(journal: str) -> tuple[int, list[str]]:
    """How many sessions the journal holds, and what is wrong with each that breaks a rule."""
    calls: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in journal.splitlines():
        token, edge, stage = line.split()
        calls[token].append((edge, stage))
    wrong = []
    for token, events in calls.items():
        shape = " ".join(f"{edge}:{stage}" for edge, stage in events)
        begins = [stage for edge, stage in events if edge == "B"]
        paired = all(
            events[i] == ("B", stage) and events[i + 1] == ("E", stage)
            for i, stage in zip(range(0, len(events), 2), begins, strict=False)
        )
        if (
            begins[:1] != ["on_negotiate"]
            or len(events) != 2 * len(begins)
            or not paired
            or begins.count("on_close") != 1
            or begins[-1] != "on_close"
        ):
            wrong.append(f"{token}: {shape}")
    return len(calls), wrong


@pytest.mark.parametrize(
    "options",
    [[], ["--workers", "2"], ["--metrics", "127.0.0.1:0"]],
    ids=["one-process", "workers-2", "metrics"],
)
def test_stops_under_load_keep_each_sessions_calls_in_order(
    tmp_path: Path, options: list[str]
) -> None:
    sessions = 0
    stop_seconds = []
    for round_ in range(ROUNDS):
        journal = tmp_path / f"journal-{round_}"
        env = {**os.environ, "PMK_JOURNAL": str(journal)}
        milter = MilterProcess(TARGET, args=["--drain-timeout", "0", *options], cwd=ROOT, env=env)
        with milter:
            stop = threading.Event()
            senders = [threading.Thread(target=_send_until, args=(milter, stop))
                       for _ in range(4)]
            for sender in senders:
                sender.start()
            parked = [_parked(milter) for _ in range(2)]
            try:
                deadline = time.monotonic() + 10
                while (not journal.exists() or journal.read_text().count("E on_eom") < 20) \
                        and time.monotonic() < deadline:
                    time.sleep(0.01)
                began = time.monotonic()
                milter.signal(signal.SIGTERM)
                assert milter.wait(20) == 0, milter.log()
                stop_seconds.append(time.monotonic() - began)
            finally:
                stop.set()
                for sender in senders:
                    sender.join(20)
                for connection in parked:
                    connection.close()
            log = milter.log()
        assert "Traceback" not in log and "not closed" not in log, log
        count, wrong = _violations(journal.read_text())
        assert count >= 12  # 20 messages on 10 connections, and the 2 parked
        assert wrong == [], "\n".join(wrong[:10])
        sessions += count
    print(f"{ROUNDS} stops, {sessions} sessions in order; stop took "
          f"{min(stop_seconds):.3f}-{max(stop_seconds):.3f} s")
