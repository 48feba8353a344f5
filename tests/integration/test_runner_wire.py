"""The real runner on libmilter, driven over the wire by pymilterkit's MTA-side client.

Each test starts its filter in its own process (libmilter allows one run per process) on a unix
socket in a temporary directory, and asserts what came back on the wire.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from pymilterkit import Actions, InetAddress, MilterError, ProtocolOpts, Stage, Status, UnixAddress
from pymilterkit.testing import (
    BodyReplaced,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    MilterClient,
    MilterConnection,
    MilterProcess,
    Negotiation,
    Progress,
    Quarantined,
    RecipientAdded,
    RecipientRemoved,
    SenderChanged,
    Step,
)

ROOT = Path(__file__).resolve().parents[2]
P = ProtocolOpts
pytestmark = pytest.mark.integration


def start(target: str, *args: str, env: dict[str, str] | None = None) -> MilterProcess:
    full_env = {**os.environ, **(env or {})}
    return MilterProcess(f"tests.integration.filters:{target}", args=args, cwd=ROOT,
                         env=full_env)


def negotiation_of(milter: MilterProcess) -> Negotiation:
    conn = open_conn(milter)
    conn.quit()
    assert conn.negotiation is not None
    return conn.negotiation


def open_conn(milter: MilterProcess, timeout: float = 10.0) -> MilterConnection:
    conn = MilterClient(milter.socket, timeout=timeout).open()
    conn.negotiate()
    return conn


@pytest.fixture
def recording() -> Iterator[MilterProcess]:
    with start("Recording") as milter:
        yield milter


def seen(answer_mods: tuple[object, ...]) -> list[str]:
    return [m.value for m in answer_mods if isinstance(m, HeaderAdded)
            and m.name.startswith("X-Seen-")]


# -- negotiation ---------------------------------------------------------------------------


def test_negotiation_flags_read_off_the_wire_are_exact() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        neg = negotiation_of(milter)
    assert neg.version == 6
    assert neg.actions == Actions.ADD_HEADER
    assert neg.protocol == (P.NO_CONNECT | P.NO_HELO | P.NO_BODY | P.NO_HDRS | P.NO_EOH
                            | P.NO_UNKNOWN | P.NO_DATA)
    assert not neg.macros


def test_every_stage_macros_and_options_negotiated(recording: MilterProcess) -> None:
    neg = negotiation_of(recording)
    assert neg.actions == Actions.ADD_HEADER | Actions.SETSYMLIST
    assert neg.protocol == P.SKIP
    assert neg.macros == {Stage.CONNECT: ("j", "{daemon_name}"), Stage.EOM: ("i",)}


def test_noreply_stages_are_negotiated_on_unix_sockets() -> None:
    with start("NoReply") as milter:
        conn = open_conn(milter)
        neg = conn.negotiation
        assert neg is not None
        assert neg.protocol & (P.NR_HDR | P.NR_RCPT) == P.NR_HDR | P.NR_RCPT
        assert not neg.protocol & P.NO_HDRS
        conn.mail("<a@example.org>")  # negotiated away: not sent
        assert conn.rcpt("<b@example.com>") is not None
        for n in range(5):
            answer = conn.header(f"X-H{n}", "v")
            assert answer is not None and answer.status is Status.NOREPLY
        eom = conn.eom()
        assert eom.status is Status.CONTINUE
        assert eom.modifications == (HeaderAdded("X-Header-Count", "5"),)
        conn.quit()


def test_noreply_is_negotiated_on_tcp_and_data_is_answered() -> None:
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with MilterProcess("tests.integration.filters:NoReply", f"inet:{port}@127.0.0.1",
                       cwd=ROOT) as milter:
        conn = open_conn(milter)
        neg = conn.negotiation
        assert neg is not None
        assert neg.protocol & (P.NR_HDR | P.NR_RCPT) == P.NR_HDR | P.NR_RCPT
        # NoReply has no on_data, yet on TCP the DATA stage is asked for and answered: its
        # reply carries the ACK that Postfix's next packet would otherwise wait ~40 ms for.
        assert not neg.protocol & P.NO_DATA
        rcpt = conn.rcpt("<b@example.com>")
        assert rcpt is not None and rcpt.status is Status.NOREPLY
        data = conn.data()
        assert data is not None and data.status is Status.CONTINUE
        answer = conn.header("X-H", "v")
        assert answer is not None and answer.status is Status.NOREPLY
        assert conn.eom().modifications == (HeaderAdded("X-Header-Count", "1"),)
        conn.quit()


# -- every stage -----------------------------------------------------------------------------


def test_every_stage_receives_its_arguments(recording: MilterProcess) -> None:
    conn = open_conn(recording)
    conn.macros(Step.CONNECT, {"j": "mx.example.org", "{daemon_name}": "smtpd"})
    assert status(conn.connect("client.example.net",
                               InetAddress(IPv4Address("192.0.2.7"), 4567))) is Status.CONTINUE
    assert status(conn.helo("helo.example.net")) is Status.CONTINUE
    assert status(conn.unknown("XFOO bar")) is Status.CONTINUE
    assert status(conn.mail("<a@example.org>", ["SIZE=42", "BODY=8BITMIME"])) is Status.CONTINUE
    assert status(conn.rcpt("<b@example.com>", ["NOTIFY=NEVER"])) is Status.CONTINUE
    assert status(conn.data()) is Status.CONTINUE
    assert status(conn.header("Subject", "caf\xe9 \u2603".encode() + b" \xff")) is Status.CONTINUE
    assert status(conn.header("X-Folded", "one\n\ttwo")) is Status.CONTINUE
    assert status(conn.eoh()) is Status.CONTINUE
    assert status(conn.body(b"line\0with nul\r\n\xff\xfe")) is Status.CONTINUE
    conn.macros(Step.EOM, {"i": "QUEUEID1"})
    eom = conn.eom()
    conn.quit()
    assert eom.status is Status.CONTINUE
    expected = [
        f"connect client.example.net {InetAddress(IPv4Address('192.0.2.7'), 4567)!r}",
        "helo helo.example.net",
        "unknown XFOO bar",
        "mail <a@example.org> {'SIZE': '42', 'BODY': '8BITMIME'}",
        "rcpt <b@example.com> {'NOTIFY': 'NEVER'}",
        "data",
        "header Subject: " + repr("caf\xe9 \u2603 \udcff"),
        "header X-Folded: " + repr("one\n\ttwo"),
        "eoh",
        "body 17 " + repr(b"line\0with nul\r\n\xff\xfe"),
    ]
    assert seen(eom.modifications) == [
        e.encode("unicode_escape").decode("ascii") for e in expected
    ]
    added = {m.name: m.value for m in eom.modifications if isinstance(m, HeaderAdded)}
    assert added["X-Macro-j"] == "mx.example.org"
    assert added["X-Macro-i"] == "QUEUEID1"


def status(answer: object) -> Status | None:
    return getattr(answer, "status", None)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (InetAddress(IPv6Address("2001:db8::5"), 25),
         "InetAddress(ip=IPv6Address('2001:db8::5'), port=25)"),
        (UnixAddress("/run/client.sock"), "UnixAddress(path='/run/client.sock')"),
        (None, "None"),
    ],
)
def test_client_addresses(recording: MilterProcess, address: object, expected: str) -> None:
    conn = open_conn(recording)
    conn.connect("host.example", address)  # type: ignore[arg-type]
    conn.mail("<a@example.org>")
    conn.rcpt("<b@example.com>")
    conn.data()
    conn.eoh()
    eom = conn.eom()
    conn.quit()
    assert seen(eom.modifications)[0] == f"connect host.example {expected}"


# -- actions -------------------------------------------------------------------------------


def test_every_action_reaches_the_mta() -> None:
    with start("EveryAction") as milter:
        conn = open_conn(milter)
        eom = conn.eom()
        conn.quit()
    assert eom.status is Status.CONTINUE
    assert eom.modifications == (
        HeaderAdded("X-Added", "one"),
        HeaderAdded("X-Folded", "first line\n\tsecond line"),
        HeaderInserted(0, "X-Inserted", "at the top"),
        HeaderChanged("Subject", 1, "changed subject"),
        HeaderDeleted("X-Remove-Me", 1),
        HeaderChanged("X-Absent", 3, "appended"),
        SenderChanged("<new-sender@example.net>", "RET=HDRS"),
        RecipientAdded("<added@example.org>", None),
        RecipientAdded("<added-par@example.org>", "NOTIFY=NEVER"),
        RecipientRemoved("<rcpt@example.org>"),
        Progress(),
        BodyReplaced(b"new body\r\n" + b"x" * 70000 + b"\r\nappended\r\n"),
        Quarantined("held for review"),
        Progress(),
    )


# -- replies and verdicts ------------------------------------------------------------------


def test_custom_replies_single_and_multi_line() -> None:
    with start("Replies") as milter:
        conn = open_conn(milter)
        single = conn.rcpt("<single@example.com>")
        multi = conn.rcpt("<multi@example.com>")
        temp = conn.rcpt("<temp@example.com>")
        plain = conn.rcpt("<plain@example.com>")
        ok = conn.rcpt("<ok@example.com>")
        conn.quit()
    assert single is not None and single.status is Status.REJECT and single.reply is not None
    assert (single.reply.code, single.reply.xcode) == ("550", "5.7.1")
    assert single.reply.lines == ("100% not wanted here",)
    assert multi is not None and multi.reply is not None
    assert multi.reply.lines == ("line one", "line two", "line three")
    assert str(multi.reply) == (
        "550-5.7.1 line one\r\n550-5.7.1 line two\r\n550 5.7.1 line three"
    )
    assert temp is not None and temp.status is Status.TEMPFAIL and temp.reply is not None
    assert (temp.reply.code, temp.reply.xcode, temp.reply.lines) == ("451", "4.3.0",
                                                                     ("try later",))
    assert plain is not None and plain.status is Status.REJECT and plain.reply is None
    assert ok is not None and ok.status is Status.CONTINUE


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "answer"),
    [("raise", Status.TEMPFAIL), ("garbage", Status.TEMPFAIL), ("int", Status.TEMPFAIL),
     ("noreply", Status.CONTINUE)],
)
def test_errors_are_answered_and_the_milter_keeps_serving(local: str, answer: Status) -> None:
    with start("Faulty") as milter:
        conn = open_conn(milter)
        bad = conn.rcpt(f"<{local}@example.com>")
        assert bad is not None and bad.status is answer
        good = conn.rcpt("<fine@example.com>")
        assert good is not None and good.status is Status.CONTINUE
        assert conn.eom().modifications == (HeaderAdded("X-Served", "yes"),)
        conn.quit()
        second = open_conn(milter)
        assert status(second.rcpt("<fine@example.com>")) is Status.CONTINUE
        second.quit()
        time.sleep(0.2)
        log = milter.log()
    if local == "raise":
        assert "Faulty.on_rcpt raised RuntimeError; answering TEMPFAIL" in log
        assert "Traceback (most recent call last)" in log
        assert "boom in on_rcpt" in log
    elif local == "noreply":
        assert "returned NOREPLY but the stage is not @noreply" in log
    else:
        assert "not a Status; answering TEMPFAIL" in log


def test_error_status_is_configurable() -> None:
    with start("Faulty", "--error-status", "reject") as milter:
        conn = open_conn(milter)
        assert status(conn.rcpt("<raise@example.com>")) is Status.REJECT
        conn.quit()


@pytest.mark.parametrize(("local", "code"), [("exit", 3), ("interrupt", 130)])
def test_systemexit_and_keyboardinterrupt_stop_the_milter(local: str, code: int) -> None:
    with start("Faulty") as milter:
        conn = open_conn(milter)
        answer = conn.rcpt(f"<{local}@example.com>")
        assert answer is not None and answer.status is Status.TEMPFAIL
        assert milter.wait(15) == code, milter.log()
        conn.close()


# -- shutdown and signals -----------------------------------------------------------------


@pytest.mark.parametrize("target", ["StopFromCallback", "StopFromThread"])
def test_shutdown_from_a_callback_or_a_thread(target: str) -> None:
    with start(target) as milter:
        conn = open_conn(milter)
        assert status(conn.helo("stop.example")) is Status.CONTINUE
        assert milter.wait(15) == 0, milter.log()
        conn.close()
        assert "Traceback" not in milter.log()


def test_sigterm_mid_message_closes_every_session(tmp_path: Path) -> None:
    log = tmp_path / "lifecycle.log"
    # No drain: SIGTERM ends the sessions at once, each with abort and close.
    with start("Lifecycle", "--drain-timeout", "0",
               env={"LIFECYCLE_LOG": str(log)}) as milter:
        conns = [open_conn(milter) for _ in range(3)]
        for conn in conns:
            conn.connect("c.example", None)
            conn.mail("<a@example.org>")
        milter.signal(signal.SIGTERM)
        assert milter.wait(15) == 0, milter.log()
        text = milter.log()
        for conn in conns:
            conn.close()
    assert "Traceback" not in text
    lines = log.read_text().splitlines()
    idents = {line.split()[0] for line in lines}
    assert len(idents) == 3
    for ident in idents:
        mine = [line.split(" ", 1)[1] for line in lines if line.startswith(ident + " ")]
        assert mine == ["new", "connect c.example", "mail", "abort", "close"], lines


# -- lifecycle -----------------------------------------------------------------------------


def events(log: Path) -> list[list[str]]:
    """Lifecycle lines grouped per session, in order of first appearance."""
    order: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        ident, event = line.split(" ", 1)
        order.setdefault(ident, []).append(event)
    return list(order.values())


def test_lifecycle_close_without_connect_quit_nc_and_abort(tmp_path: Path) -> None:
    log = tmp_path / "lifecycle.log"
    with start("Lifecycle", env={"LIFECYCLE_LOG": str(log)}) as milter:
        # 1. negotiation only, then hang-up: the session is closed without connect
        open_conn(milter).close()
        # 2. Postfix style: abort after every message; then QUIT_NC and a new connect
        conn = open_conn(milter)
        conn.connect("first.example", None)
        conn.mail("<a@example.org>")
        conn.eom()
        conn.abort()  # after eom: not a message in progress, on_abort must not run
        conn.mail("<b@example.org>")
        conn.abort()  # mid-message: on_abort runs
        conn.abort()  # again: idempotent
        conn.mail("<c@example.org>")
        conn.eom()
        conn.quit_new_connection()
        conn.connect("second.example", None)
        conn.mail("<d@example.org>")
        conn.quit()
        time.sleep(0.3)
    sessions = events(log)
    assert sessions == [
        ["new", "close"],
        ["new", "connect first.example", "mail", "eom", "mail", "abort", "mail", "eom", "close"],
        ["new", "connect second.example", "mail", "abort", "close"],
    ]


def test_a_constructor_failing_at_connect_after_quit_nc_is_answered_and_logged() -> None:
    with start("FailsOnSecondSession") as milter:
        conn = open_conn(milter)
        assert status(conn.connect("first.example", None)) is Status.CONTINUE
        conn.mail("<a@example.org>")
        conn.abort()  # libmilter takes QUIT_NC only between messages
        conn.quit_new_connection()
        assert status(conn.connect("second.example", None)) is Status.TEMPFAIL
        conn.quit()
        other = open_conn(milter)  # the milter keeps serving
        assert status(other.connect("third.example", None)) is Status.CONTINUE
        other.quit()
        time.sleep(0.2)
        log = milter.log()
    assert "RuntimeError: second session refused" in log
    assert "Traceback" in log


def test_no_session_outlives_its_connection_after_10000_connections() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        client = MilterClient(milter.socket, timeout=10)
        errors: list[Exception] = []

        def worker(count: int) -> None:
            try:
                for _ in range(count):
                    conn = client.open()
                    conn.negotiate()
                    conn.quit()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(2500,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        # The last sessions may still be closing: give libmilter a moment, then stop.
        time.sleep(0.5)
        milter.signal(signal.SIGTERM)
        assert milter.wait(15) == 0
        log = milter.log()
    assert "stopped: 10000 session(s) served, 0 left open by libmilter" in log, log[-2000:]


def test_two_concurrent_connections_keep_their_own_state() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        a, b = open_conn(milter), open_conn(milter)
        a.mail("<a@example.org>")
        b.mail("<b@example.org>")
        for n in range(3):
            a.rcpt(f"<a{n}@example.com>")
        b.rcpt("<b0@example.com>")
        assert b.eom().modifications == (HeaderAdded("X-Rcpt-Count", "1"),)
        assert a.eom().modifications == (HeaderAdded("X-Rcpt-Count", "3"),)
        a.quit()
        b.quit()


def test_many_threads_many_messages() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        client = MilterClient(milter.socket, timeout=10)
        failures: list[str] = []

        def worker(k: int) -> None:
            for m in range(40):
                n = (k + m) % 5 + 1
                result = client.run(b"Subject: x\r\n\r\nbody\r\n",
                                    recipients=[f"r{i}@example.com" for i in range(n)])
                if result.header("X-Rcpt-Count") != str(n):
                    failures.append(f"{k}/{m}: {result}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []


def test_a_slow_stage_does_not_wedge_other_connections() -> None:
    with start("Slow") as milter:
        slow = open_conn(milter, timeout=20)
        done = threading.Event()

        def slow_helo() -> None:
            slow.helo("sleep-3")
            done.set()

        thread = threading.Thread(target=slow_helo)
        thread.start()
        time.sleep(0.2)
        began = time.monotonic()
        fast = open_conn(milter)
        assert status(fast.helo("quick.example")) is Status.CONTINUE
        fast.quit()
        assert time.monotonic() - began < 1.5
        assert not done.is_set()
        thread.join(10)
        assert done.is_set()
        slow.quit()


def test_a_stop_waits_for_a_running_stage_before_closing_its_session(tmp_path: Path) -> None:
    log = tmp_path / "lifecycle.log"
    with start("Slow", "--drain-timeout", "0",
               env={"LIFECYCLE_LOG": str(log)}) as milter:
        conn = open_conn(milter, timeout=20)
        thread = threading.Thread(target=conn.helo, args=("sleep-1.5",))
        thread.start()
        time.sleep(0.5)  # on_helo is running now
        milter.signal(signal.SIGTERM)
        assert milter.wait(15) == 0, milter.log()
        thread.join(10)
        conn.close()
        assert "Traceback" not in milter.log()
    # on_close ran only after on_helo had returned, not under it.
    assert log.read_text().splitlines() == ["helo done", "close"]


def test_the_stop_summary_agrees_with_the_sessions_left_running() -> None:
    # Two sessions stuck in on_helo past the stop's grace, one idle: the summary counts each
    # kind as the per-session lines do.
    with start("Slow", "--drain-timeout", "0") as milter:
        stuck = [open_conn(milter, timeout=40) for _ in range(2)]
        idle = open_conn(milter)

        def helo(conn: MilterConnection) -> None:
            with contextlib.suppress(OSError, MilterError):  # the stop ends the connection
                conn.helo("sleep-20")

        threads = [threading.Thread(target=helo, args=(c,), daemon=True) for c in stuck]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # both on_helo are running now
        milter.signal(signal.SIGTERM)
        milter.wait(40)
        log = milter.log()
        idle.close()
        for conn in stuck:
            conn.close()
    assert log.count("a session is still in on_helo at stop: not closed") == 2, log[-3000:]
    assert "3 left open by libmilter: 1 closed here, 2 still running (not closed)" in log, (
        log[-3000:])


def test_harness_with_tcp_models_the_runner_on_an_inet_socket() -> None:
    import socket

    from pymilterkit.testing import Harness

    from .filters import NoReply

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    message = b"Subject: a\r\nX-Two: b\r\n\r\nbody\r\n"
    with MilterProcess("tests.integration.filters:NoReply", f"inet:{port}@127.0.0.1",
                       cwd=ROOT) as milter:
        real = MilterClient(milter.socket).run_connection([message])
    modelled = Harness(NoReply, tcp=True).run_connection([message])
    assert real == modelled
    assert modelled.negotiation is not None
    assert modelled.negotiation.protocol & P.NR_HDR
    assert not modelled.negotiation.protocol & P.NO_DATA  # DATA answered on TCP
    assert modelled.messages[0].header("X-Header-Count") == "2"
    assert Harness(NoReply).run_connection([message]) != real  # on unix: no DATA stage


def thread_states(client: MilterClient) -> tuple[int, int]:
    """(Python thread states, OS threads) of the ThreadStates milter, read off one message."""
    value = client.run(b"\r\n").header("X-Thread-States")
    assert value is not None
    states, threads = value.split()
    return int(states), int(threads)


def test_thread_states_of_ended_libmilter_workers_are_released() -> None:
    # libmilter's pool starts workers under concurrent load and ends them when idle; each worker
    # gets one pinned Python thread state. Bursts of 24 connections make the pool grow and
    # shrink several times; afterwards the process must not hold more thread states than it
    # has threads (+2 for slack: the interpreter's own, one being created).
    with MilterProcess("tests.integration.filters:ThreadStates", cwd=ROOT) as milter:
        client = MilterClient(milter.socket, timeout=10)
        errors: list[Exception] = []

        def worker() -> None:
            try:
                for _ in range(3):
                    client.run(b"Subject: x\r\n\r\nbody\r\n", recipients=["r@example.com"])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        peak = 0
        for _ in range(5):
            threads = [threading.Thread(target=worker) for _ in range(24)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors
            peak = max(peak, thread_states(client)[0])
        time.sleep(2.5)  # the runner releases ended workers' states about once a second
        states, live = thread_states(client)
        milter.signal(signal.SIGTERM)
        assert milter.wait(15) == 0
        log = milter.log()
    assert states <= live + 2, (states, live, peak)
    # The bursts really did end workers (or this test proves nothing):
    assert re.search(r"released \d+ thread state\(s\) of ended libmilter workers", log), log[-2000:]
