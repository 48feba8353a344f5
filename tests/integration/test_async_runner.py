"""`async def` stages on the real runner: answered by the event loop, off libmilter's threads.

Each test starts a filter of `async_filters.py` in its own process on a unix socket in a
temporary directory and drives it over the wire with pymilterkit's MTA-side client.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

import pytest

from pymilterkit import MilterError, Status
from pymilterkit.testing import HeaderAdded, MilterClient, MilterProcess, Progress, Step
from pymilterkit.testing._client import SocketEndpoint

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"Subject: hi\r\nX-A: 1\r\n\r\nbody\r\n"
pytestmark = pytest.mark.integration


def start(target: str, *args: str, delay: float | None = None) -> MilterProcess:
    env = dict(os.environ)
    if delay is not None:
        env["PMK_DELAY"] = str(delay)
    return MilterProcess(f"tests.integration.async_filters:{target}", args=args, cwd=ROOT,
                         env=env)


def slow_rcpt(milter: MilterProcess) -> SocketEndpoint:
    """A connection whose RCPT (`slow@y`, the `Ordered` filter's slow lookup) is running."""
    conn = MilterClient(milter.socket, timeout=10).open()
    conn.negotiate()
    conn.mail("<a@x>")
    endpoint = conn.endpoint
    assert isinstance(endpoint, SocketEndpoint)
    endpoint.send(b"R", b"<slow@y>\0", Step.RCPT)
    return endpoint


@pytest.mark.parametrize("workers", ["1", "2"])
def test_async_rcpt_and_eom_answer_over_the_wire(workers: str) -> None:
    with start("AsyncRcpt", "--workers", workers) as milter:
        client = MilterClient(milter.socket, timeout=10)
        for _ in range(3):  # several connections: each worker's loop serves them
            result = client.run(MESSAGE, recipients=["a@x", "bad@y", "c@z"])
            assert [r.status for r in result.recipients] == [
                Status.CONTINUE, Status.REJECT, Status.CONTINUE
            ]
            reply = result.recipients[1].reply
            assert reply is not None and (reply.code, reply.xcode) == ("550", "5.1.1")
            assert reply.lines == ("no such user",)
            assert result.modifications == (
                HeaderAdded("X-Rcpts", "2"),
                HeaderAdded("X-Started-In", "True"),  # on_worker_start ran in this process
            )


def test_every_stage_async_keeps_the_stage_order() -> None:
    with start("AsyncEverything") as milter:
        result = MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["a@x", "b@y"])
        assert result.modifications == (
            HeaderAdded("X-Seen", "connect,helo,mail,rcpt,rcpt,header,header,eoh,body,eom"),
        )
        assert milter.stop() == 0
        assert "Traceback" not in milter.log()


def test_a_sync_stage_waits_for_the_noreply_async_stage_before_it() -> None:
    # The MTA does not wait for a @noreply RCPT: end of message arrives while the coroutines
    # still run, and the sync on_eom must see all of them done.
    with start("NoReplyRcpt", delay=0.05) as milter:
        result = MilterClient(milter.socket, timeout=10).run(
            MESSAGE, recipients=["a@x", "b@y", "c@z"]
        )
        assert result.modifications == (HeaderAdded("X-Rcpts", "3"),)


def test_lookups_of_many_connections_run_at_once() -> None:
    """20 connections whose lookups take 2 s each: they wait on the loop together (libmilter's
    pool, if its threads waited for each, would let about 2 run at a time; the threshold
    leaves room for a loaded machine starting the 20 clients slowly)."""
    with start("InFlight", delay=2.0) as milter:
        results: list[str | None] = []

        def send() -> None:
            result = MilterClient(milter.socket, timeout=30).run(MESSAGE, recipients=["a@x"])
            results.append(result.header("X-Most"))

        threads = [threading.Thread(target=send) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 20
        assert max(int(most or 0) for most in results) >= 12


def test_a_stage_past_its_deadline_is_cancelled_and_answered() -> None:
    with start("Deadline", "--stage-timeout", "0.3", "--timeout-status", "reject") as milter:
        client = MilterClient(milter.socket, timeout=10)
        result = client.run(MESSAGE, recipients=["fast@x", "slow@y", "fast2@z", "block@z"])
        assert [r.status for r in result.recipients] == [
            Status.CONTINUE, Status.REJECT, Status.CONTINUE, Status.CONTINUE
        ]
        assert result.status is Status.CONTINUE  # the connection went on to the message
        assert client.run(MESSAGE, recipients=["fast@x"]).status is Status.CONTINUE
        milter.stop()
        log = milter.log()
    assert re.search(r"Deadline\.on_rcpt still running after 0\.[3-9]\d* s, past its deadline "
                     r"\(0\.3 s\): cancelled, answering REJECT", log), log
    # The one that blocked in its first step could not be cancelled: logged like a sync stage.
    assert re.search(r"Deadline\.on_rcpt still running after 0\.[3-9]\d* s, past its deadline "
                     r"\(0\.3 s\): it blocks", log), log


def test_async_errors_follow_the_error_policy() -> None:
    with start("Strays") as milter:
        result = MilterClient(milter.socket, timeout=10).run(
            MESSAGE, recipients=["cancel@x", "raise@y", "wrong@z", "ok@w"]
        )
        assert [r.status for r in result.recipients] == [Status.TEMPFAIL] * 3 + [
            Status.CONTINUE
        ]
        assert milter.stop() == 0  # a stray CancelledError did not stop the milter
        log = milter.log()
    assert "Strays.on_rcpt raised CancelledError; answering TEMPFAIL" in log
    assert "Strays.on_rcpt raised RuntimeError; answering TEMPFAIL" in log
    assert "Strays.on_rcpt returned 'yes', not a Status; answering TEMPFAIL" in log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_failing_on_worker_start_stops_start_up(workers: str) -> None:
    milter = start("BrokenStart", "--workers", workers)
    try:
        try:
            milter.start()  # with workers the parent's socket may accept before they fail
        except MilterError as exc:
            assert re.search(r"exited with [1-9]\d* during start", str(exc))
        else:
            assert milter.wait(20) != 0
        log = milter.log()
    finally:
        milter.__exit__(None, None, None)
    assert "RuntimeError: no database" in log  # with its traceback
    assert "BrokenStart.on_worker_start failed" in log
    assert log.count("on_worker_start failed; not serving") <= int(workers)  # not retried


@pytest.mark.parametrize("target", ["SlowEom", "SlowEomSync"])
def test_progress_is_sent_while_a_slow_eom_runs(target: str) -> None:
    with start(target, "--progress-interval", "0.5", delay=2.2) as milter:
        result = MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["a@x"])
        progress = [m for m in result.modifications if isinstance(m, Progress)]
        assert len(progress) >= 2
        assert result.modifications[-1] == HeaderAdded("X-Slow", "done")
        assert result.status is Status.CONTINUE


def test_no_progress_when_switched_off() -> None:
    with start("SlowEom", "--progress-interval", "0", delay=1.2) as milter:
        result = MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["a@x"])
        assert result.modifications == (HeaderAdded("X-Slow", "done"),)


def test_a_connection_closed_during_an_async_stage_is_closed_after_it() -> None:
    with start("Ordered", delay=30) as milter:
        endpoint = slow_rcpt(milter)  # the 30 s lookup starts; then hang up
        threading.Event().wait(0.3)
        endpoint.sock.shutdown(socket.SHUT_RDWR)
        endpoint.close()
        for _ in range(100):
            if "closed after rcpt ended" in milter.log():
                break
            threading.Event().wait(0.05)
        assert MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["a@x"])
        milter.stop()
        log = milter.log()
    assert "closed after rcpt ended: True" in log  # on_close came after the stage ended
    assert "Ordered.on_rcpt: the connection closed while it ran; cancelled" in log


def test_a_hang_up_right_after_the_command_does_not_hold_the_session() -> None:
    with start("Ordered", delay=30) as milter:
        for _ in range(5):
            endpoint = slow_rcpt(milter)
            endpoint.sock.shutdown(socket.SHUT_RDWR)
            endpoint.close()
        result = MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["a@x"])
        assert result.status is Status.CONTINUE
        assert milter.stop() == 0
        log = milter.log()
    assert log.count("closed after rcpt ended") == 6  # every session was closed
    assert "0 left open" in log


def test_a_stop_during_an_async_stage_cancels_it_cleanly() -> None:
    """libmilter frees its contexts at stop: a pending stage is cancelled first, and nothing is
    sent on its connection afterwards (exit 0, no crash)."""
    with start("Ordered", "--drain-timeout", "0", delay=30) as milter:  # stop, no drain
        conns = []
        for _ in range(3):
            conns.append(slow_rcpt(milter))
        threading.Event().wait(0.3)
        assert milter.stop() == 0
        log = milter.log()
        for endpoint in conns:
            endpoint.close()
    assert "stop: 3 async stage(s) still running were cancelled" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("debug", [False, True])
def test_a_coroutine_starts_on_libmilters_thread_and_goes_on_on_the_loop(debug: bool) -> None:
    # A coroutine that does not suspend is answered on libmilter's thread (no hand-off);
    # one that does goes on on the loop as the same task. Also in asyncio's debug mode,
    # whose checks want the loop's methods called on its thread.
    env = dict(os.environ, PYTHONASYNCIODEBUG="1") if debug else None
    target = "tests.integration.async_filters:FirstStep"
    with MilterProcess(target, cwd=ROOT, env=env) as milter:
        result = MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["late@x"])
        headers = {m.name: m.value for m in result.modifications if isinstance(m, HeaderAdded)}
        assert headers["X-Rcpt-Thread"] not in ("pymilterkit-loop", "MainThread")
        before, after = headers["X-Eom-Threads"].split()
        assert before != "pymilterkit-loop" and after == "pymilterkit-loop"
        assert headers["X-Same-Task"] == "True"
        assert headers["X-Own-Deadline"] == "kept"
        assert headers["X-Fired"] == "True"  # the timer set by the quick RCPT ran
