"""Deadlines per stage on a real milter process (issue 28 items 1, 2, 5; issue 27 item 4):
per-stage values, a sync stage reported when its deadline passes, async stages that swallow
their cancellation, block the loop or stop it, and automatic progress counted."""

from __future__ import annotations

import re
import signal
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from pymilterkit import InetAddress, Status
from pymilterkit.testing import MilterClient, MilterConnection, MilterProcess, Step
from tests.integration.test_metrics import endpoint, get, scrape, value, wait_until

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@example.net\r\nSubject: hello\r\n\r\nHello.\r\n"
METRICS = ("--metrics", "127.0.0.1:0")
pytestmark = pytest.mark.integration


def start(target: str, *args: str) -> MilterProcess:
    return MilterProcess(f"tests.integration.deadline_filters:{target}", args=args, cwd=ROOT)


def in_message(milter: MilterProcess, sender: str) -> MilterConnection:
    """A fresh connection, negotiated, connected and past MAIL FROM `sender`."""
    conn = MilterClient(milter.socket, timeout=30).open()
    conn.negotiate()
    conn.connect("client.example.net", None)
    conn.mail(sender)
    return conn


def rcpt(milter: MilterProcess, recipient: str) -> tuple[Status | None, float]:
    """One RCPT (queue id QID7) of a fresh connection: its answer and how long it took."""
    conn = MilterClient(milter.socket, timeout=30).open()
    try:
        conn.negotiate()
        conn.connect("client.example.net", InetAddress(IPv4Address("192.0.2.7"), 4567))
        conn.mail("<a@example.org>")
        conn.macros(Step.RCPT, {"i": "QID7"})
        began = time.monotonic()
        answer = conn.rcpt(f"<{recipient}@example.com>")
        return (None if answer is None else answer.status), time.monotonic() - began
    finally:
        conn.close()


def test_a_sync_stage_is_reported_when_its_deadline_passes_not_when_it_returns() -> None:
    with start("SlowSync", "--stage-timeout", "0.5", *METRICS) as milter:
        address = endpoint(milter)
        result: list[tuple[Status | None, float]] = []
        client = threading.Thread(target=lambda: result.append(rcpt(milter, "sleep-4")))
        client.start()
        pattern = (r"WARNING session=\d+-\d+ queue_id=QID7 stage=on_rcpt: "
                   r"SlowSync\.on_rcpt still running after 0\.[5-9]\d* s, past its deadline "
                   r"\(0\.5 s\): it blocks .*; the MTA gives up at Postfix's "
                   r"milter_command_timeout \(30 s by default\)")
        wait_until(lambda: re.search(pattern, milter.log()) is not None, "the warning", 3.0)
        assert not result  # still running: reported at its deadline, not when it returned
        assert value(scrape(address), "pymilterkit_stage_timeouts_total", stage="rcpt") == 1
        client.join(30)
        assert result and result[0][0] is Status.CONTINUE  # a sync stage goes on
        assert len(re.findall("past its deadline", milter.log())) == 1


@pytest.mark.parametrize("how", ["flags", "config"])
def test_deadlines_per_stage(how: str, tmp_path: Path) -> None:
    """rcpt gets 3 s, every other stage 0.3 s: a 1 s lookup in rcpt is answered, a 1 s end of
    message is cancelled (with one deadline for every stage, one of them had to give)."""
    if how == "flags":
        args: tuple[str, ...] = ("--stage-timeout", "0.3", "--stage-timeout", "rcpt=3")
    else:
        config = tmp_path / "milter.toml"
        config.write_text("stage-timeout = {default = 0.3, rcpt = 3}\n")
        args = ("--config", str(config))
    with start("Stubborn", *args) as milter:
        result = MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["sleep-1@x"])
        assert [r.status for r in result.recipients] == [Status.CONTINUE]
        assert result.status is Status.TEMPFAIL
        pattern = (r"Stubborn\.on_eom still running after \d+\.\d+ s, past its deadline "
                   r"\(0\.3 s\): cancelled, answering TEMPFAIL")
        wait_until(lambda: re.search(pattern, milter.log()) is not None, "the warning")


def test_a_stage_that_swallows_its_cancellation_is_answered_at_the_deadline() -> None:
    with start("Stubborn", "--stage-timeout", "0.5") as milter:
        status, took = rcpt(milter, "swallow")
        assert status is Status.TEMPFAIL
        assert took < 2.5, took  # not after the 5 s it goes on for
        assert rcpt(milter, "fast")[0] is Status.CONTINUE
        log = milter.log()
    assert re.search(r"WARNING session=\d+-\d+ queue_id=QID7 stage=on_rcpt: "
                     r"Stubborn\.on_rcpt still running after 0\.[5-9]\d* s, past its deadline "
                     r"\(0\.5 s\): it did not stop when cancelled: answering TEMPFAIL, "
                     r"abandoned", log), log


def test_an_abandoned_on_message_leaves_the_next_message_of_its_connection_alone() -> None:
    # The abandoned stage ends while the next message is being collected: that message is
    # still whole when its on_message runs.
    with start("StubbornWhole", "--stage-timeout", "eom=0.3") as milter:
        conn = in_message(milter, "<one@example.org>")
        try:
            conn.rcpt("<r1@example.com>")
            conn.header("Subject", " swallow")
            conn.eoh()
            first = conn.eom()
            conn.mail("<two@example.org>")
            conn.rcpt("<r2@example.com>")
            conn.header("Subject", " second")
            wait_until(lambda: "the abandoned stage ended" in milter.log(), "the abandoned stage")
            conn.header("To", " b@example.com")
            conn.eoh()
            conn.body(b"two\r\n")
            second = conn.eom()
            conn.quit()
        finally:
            conn.close()
        log = milter.log()
    assert first is not None and first.status is Status.TEMPFAIL
    assert second is not None and second.status is Status.CONTINUE, log
    assert "on_message saw sender=<two@example.org> recipients=<r2@example.com> headers=2" in log


def test_a_recipient_answered_at_its_deadline_is_not_among_the_messages_recipients() -> None:
    with start("StubbornWhole", "--stage-timeout", "rcpt=0.3") as milter:
        conn = in_message(milter, "<one@example.org>")
        try:
            answers = [conn.rcpt(f"<{name}@example.com>") for name in ("fast", "swallow")]
            # its coroutine returns CONTINUE after the MTA was answered TEMPFAIL
            wait_until(lambda: "the abandoned stage ended" in milter.log(), "the abandoned stage")
            conn.header("Subject", " hello")
            conn.eoh()
            last = conn.eom()
            conn.quit()
        finally:
            conn.close()
        log = milter.log()
    assert [None if a is None else a.status for a in answers] == [
        Status.CONTINUE, Status.TEMPFAIL]
    assert last is not None and last.status is Status.CONTINUE
    assert "on_message saw sender=<one@example.org> recipients=<fast@example.com> " in log, log


def test_an_abandoned_stage_cannot_act_on_the_stage_its_session_is_in_by_then() -> None:
    with start("Lingering", "--stage-timeout", "rcpt=0.3") as milter:
        conn = in_message(milter, "<one@example.org>")
        try:
            abandoned = conn.rcpt("<late@example.com>")
            conn.rcpt("<fast@example.com>")
            conn.header("Subject", " hello")
            conn.eoh()
            last = conn.eom()  # waits until the abandoned stage tried its calls
            conn.quit()
        finally:
            conn.close()
        log = milter.log()
    assert abandoned is not None and abandoned.status is Status.TEMPFAIL
    assert last is not None and last.status is Status.CONTINUE and last.modifications == ()
    assert log.count("abandoned call refused: ") == 2, log
    assert "set_reply(): this stage was answered at its deadline and abandoned" in log
    assert "add_header(): this stage was answered at its deadline and abandoned" in log


def test_a_hang_up_during_a_stage_that_ignores_cancellation_does_not_hold_on_close() -> None:
    with start("Lingering", "--stage-timeout", "rcpt=30") as milter:
        conn = in_message(milter, "<one@example.org>")
        conn.endpoint.send(b"R", b"<swallow@example.com>\0", Step.RCPT)  # not waited for
        wait_until(lambda: "lingering stage began" in milter.log(), "the stage")
        began = time.monotonic()
        conn.close()
        wait_until(lambda: "on_close ran" in milter.log(), "on_close")
        took = time.monotonic() - began
        log = milter.log()
    assert took < 3, (took, log)  # not the 4 s the stage goes on for, nor its 30 s deadline
    assert "the connection closed while it ran, and it did not stop when cancelled: " \
        "abandoned" in log


def test_a_stop_while_libmilter_waits_for_an_abandoned_stage_answers_it() -> None:
    # A body chunk in the end-of-message packet: libmilter's thread waits for the stage's
    # answer itself. The stop cancels the stage, which goes on, and abandons it: the thread
    # gets the error status, and no exception reaches libmilter's C code.
    with start("SwallowBody", "--drain-timeout", "1") as milter:
        conn = in_message(milter, "<a@example.org>")
        try:
            conn.rcpt("<b@example.com>")
            conn.header("Subject", " x")
            conn.eoh()
            conn.endpoint.send(b"E", b"body in the end-of-message packet\r\n", Step.EOM)
            wait_until(lambda: "on_body began" in milter.log(), "on_body")
            milter.signal(signal.SIGTERM)
            assert milter.wait(30) == 0
        finally:
            conn.close()
        log = milter.log()
    assert "it did not stop when cancelled: abandoned" in log, log
    assert "Exception ignored" not in log and "InvalidStateError" not in log, log


def test_a_blocking_call_in_an_async_stage_is_reported_at_the_deadline() -> None:
    with start("Stubborn", "--stage-timeout", "0.5") as milter:
        result: list[tuple[Status | None, float]] = []
        client = threading.Thread(target=lambda: result.append(rcpt(milter, "block")))
        client.start()
        pattern = (r"WARNING session=\d+-\d+ queue_id=QID7 stage=on_rcpt: "
                   r"Stubborn\.on_rcpt still running after [01]\.\d+ s, past its deadline "
                   r"\(0\.5 s\): the event loop is blocked")
        wait_until(lambda: re.search(pattern, milter.log()) is not None, "the warning", 3.0)
        client.join(30)
        assert result and result[0][1] > 1.4  # answered once the loop ran again


def test_an_event_loop_a_stage_stopped_runs_again_and_is_counted() -> None:
    with start("Stubborn", *METRICS) as milter:
        address = endpoint(milter)
        assert rcpt(milter, "stop")[0] is Status.CONTINUE
        for _ in range(3):  # before: TEMPFAIL for every later async stage
            assert rcpt(milter, "fast")[0] is Status.CONTINUE
        samples = scrape(address)
        assert value(samples, "pymilterkit_event_loop_restarts_total") == 1
        assert value(samples, "pymilterkit_up") == 1
        assert get(address, "/healthz") == (200, "serving\n")
        assert "the event loop was stopped (by a stage?): running it again" in milter.log()


def test_an_event_loop_that_cannot_run_fails_healthz_and_is_counted() -> None:
    with start("Stubborn", *METRICS) as milter:
        address = endpoint(milter)
        assert get(address, "/healthz") == (200, "serving\n")
        assert rcpt(milter, "close")[0] is Status.CONTINUE  # then the loop is closed
        wait_until(lambda: "test filter: the event loop is closed" in milter.log(), "close", 5.0)
        wait_until(lambda: get(address, "/healthz") == (503, "event loop down\n"), "503", 5.0)
        assert "the event loop was closed (by a stage?)" in milter.log()  # before any stage
        assert rcpt(milter, "fast")[0] is Status.TEMPFAIL  # the configured failure status
        assert value(scrape(address), "pymilterkit_up") == 0  # a dashboard sees it too
        assert "the event loop is down: async stages cannot be served" in milter.log()


@pytest.mark.parametrize("target", ["SlowSync", "Stubborn", "BusyFirstStep"],
                         ids=["sync", "async", "async-first-step"])
def test_automatic_progress_is_counted(target: str) -> None:
    args = ("--progress-interval", "0.3", *METRICS)
    with start(target, *args) as milter:
        address = endpoint(milter)
        result = MilterClient(milter.socket, timeout=10).run(MESSAGE, recipients=["sleep-1.2@x"])
        assert result.status is Status.CONTINUE
        assert result.progress_count >= 2
        wait_until(lambda: value(scrape(address), "pymilterkit_actions_total",
                                 action="progress") == result.progress_count, "progress counted")
