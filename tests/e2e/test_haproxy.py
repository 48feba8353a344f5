"""Postfix -> HAProxy (TCP mode) -> three pymilterkit instances: spread, failover, rolling restart.

The topology is built by `tests/e2e/haproxy.py` (see its docstring): a throwaway Postfix whose
only milter is HAProxy on 127.0.0.1, three `pymilterkit run` instances on 127.0.0.2-4 standing
for three hosts, HAProxy health-checking them, and an LMTP sink collecting what Postfix
delivers. Every delivered message is checked for the filter's header; every message the client
sent is accounted for (delivered, or refused with the code the test expects). Counts and times
are printed (``-s``); `benchmarks/haproxy_fleet.py` measures them with more messages.
"""

from __future__ import annotations

import smtplib
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from .haproxy import (
    RECIPIENTS,
    SENDER,
    Load,
    Topology,
    check_deliveries,
    failover,
    message_for,
    rolling_restart,
)
from .postfix import PostfixFactory

TEMPFAIL = (451, b"4.7.1 Service unavailable - try again later")

pytestmark = pytest.mark.e2e


@pytest.fixture
def topology(postfix_factory: PostfixFactory) -> Iterator[Topology]:
    """Sink, three instances (HAProxy checks their /healthz), HAProxy and Postfix; logs shown
    on failure."""
    _ = postfix_factory  # (for its root check; the Postfix here is the topology's own)
    with Topology(health="http") as topo:
        yield topo
        print(topo.logs())


def test_postfix_reaches_three_instances_through_haproxy(topology: Topology) -> None:
    # The SMTP clients connect from 127.0.0.5; HAProxy connects to the milters from 127.0.0.1.
    load = Load(topology.smtp_port, 240, concurrency=12, per_session=4, prefix="s",
                source="127.0.0.5")
    outcomes = load.run()
    assert Counter(o.code for o in outcomes) == {250: 240}
    served = check_deliveries(outcomes, topology.sink)
    per_instance = Counter(served.values())
    assert set(per_instance) == {"m1", "m2", "m3"}, per_instance
    # The filter saw the SMTP client's address, not HAProxy's: the milter protocol carries it
    # (no PROXY protocol needed).
    clients = Counter(d.headers()["X-Smtp-Client"] for d in topology.sink.deliveries())
    assert clients == {"127.0.0.5": 240}
    # HAProxy counted the milter connections: one per SMTP session (4 messages each), on
    # every instance, each of which ended.
    sessions = topology.haproxy.total_sessions()
    assert set(sessions) == {"m1", "m2", "m3"} and all(sessions.values()), sessions
    assert sum(sessions.values()) >= 240 // 4
    assert all(topology.haproxy.current_sessions(name) == 0 for name in sessions)
    print(f"messages per instance {dict(per_instance)}; HAProxy sessions {sessions}")


def test_sigkill_fails_only_the_sessions_in_flight_and_the_instance_rejoins(
    topology: Topology,
) -> None:
    report = failover(topology, "m2", before=700, after=700)
    print(report.summary())
    # Only what was on the killed instance failed, tempfailed as milter_default_action says,
    # and only in SMTP sessions that were open when it died.
    assert report.failures, "no session was in flight on the killed instance"
    assert {(o.code, o.reply) for o in report.failures} == {
        (451, "4.7.1 Service unavailable - try again later")}
    assert report.failed_later == []
    assert len(report.failures) <= report.in_flight_at_kill + 12  # (sessions opened meanwhile)
    # HAProxy's check took it out (connection refused), and redispatched what it had sent there.
    assert report.check_status == "L4CON"
    # Everything else was delivered with the filter's header (check_deliveries), by the two
    # survivors and, after its restart, the killed instance again.
    assert len(report.served) == len(report.outcomes) - len(report.failures) > 1400
    rejoined = Counter(report.served[k] for k in report.after_rejoin if k in report.served)
    assert rejoined["m2"] > 0, rejoined
    # The client retries what was tempfailed, as an MTA would: now nothing is missing.
    retry = Load(topology.smtp_port, 0)
    retry_outcomes = [retry.send_one(o.key) for o in report.failures]
    assert all(o.accepted for o in retry_outcomes), retry_outcomes
    everything = check_deliveries(
        [o for o in report.outcomes if o.accepted] + retry_outcomes, topology.sink)
    assert len(everything) == len(report.outcomes)


def test_rolling_restart_through_haproxy_drain_loses_nothing(topology: Topology) -> None:
    report = rolling_restart(topology, "runtime-api")
    print(report.summary())
    assert [step.instance for step in report.steps] == ["m1", "m2", "m3"]
    assert all(step.exit_status == 0 for step in report.steps), report.steps
    assert all(instance.starts == 2 for instance in topology.fleet)
    assert report.failures == []
    assert len(report.served) == len(report.outcomes) > 600


def test_rolling_restart_by_sigterm_drain_loses_nothing(postfix_factory: PostfixFactory) -> None:
    """Only SIGTERM: the runner drains (/healthz 503, no new connections, sessions in flight
    finish), HAProxy's check takes it out, the new process comes back through the same check."""
    _ = postfix_factory
    with Topology(health="http", milter_args=["--drain-timeout", "20"]) as topo:
        try:
            report = rolling_restart(topo, "sigterm")
            print(report.summary())
            assert [step.instance for step in report.steps] == ["m1", "m2", "m3"]
            assert all(step.exit_status == 0 for step in report.steps), report.steps
            assert all(instance.starts == 2 for instance in topo.fleet)
            assert report.failures == []
            assert len(report.served) == len(report.outcomes) > 600
        finally:
            print(topo.logs())


def _mail_reply(smtp: smtplib.SMTP, key: str) -> tuple[int, bytes]:
    try:
        assert smtp.sendmail(SENDER, list(RECIPIENTS), message_for(key)) == {}
    except smtplib.SMTPResponseException as exc:
        error: bytes | str = exc.smtp_error
        return exc.smtp_code, error.encode() if isinstance(error, str) else error
    return 250, b""


def test_what_fails_how_idle_cut_no_instance_no_haproxy(postfix_factory: PostfixFactory) -> None:
    """The failures of docs/guides/several-hosts.md that are not an instance dying: each is
    Postfix's milter_default_action (tempfail), for the rest of the SMTP session."""
    _ = postfix_factory
    with Topology(idle_timeout="2s") as topo:
        try:
            # 1. HAProxy's idle timeout shorter than the SMTP session's pauses: it cuts the
            # milter connection, and the next message of that session is tempfailed.
            with smtplib.SMTP("127.0.0.1", topo.smtp_port, timeout=30) as smtp:
                smtp.ehlo("client.example.net")
                assert _mail_reply(smtp, "idle-1") == (250, b"")
                time.sleep(3.5)
                assert _mail_reply(smtp, "idle-2") == TEMPFAIL
                assert _mail_reply(smtp, "idle-3") == TEMPFAIL  # the session stays failed
            assert " cD " in topo.haproxy.log_text()  # (client-side timeout, in data)
            topo.wait_postfix_log("can't read SMFIC_MAIL reply packet header")
            # 2. Every instance down: HAProxy accepts Postfix's connection, finds no server
            # and closes it; the negotiation fails.
            for instance in topo.fleet:
                instance.kill()
            for instance in topo.fleet:
                topo.haproxy.wait_status(instance.name, "DOWN")
            with smtplib.SMTP("127.0.0.1", topo.smtp_port, timeout=30) as smtp:
                smtp.ehlo("client.example.net")
                assert _mail_reply(smtp, "none-1") == TEMPFAIL
            topo.wait_postfix_log("read error in initial handshake")
            # 3. HAProxy itself gone: Postfix's connect is refused.
            topo.haproxy.stop()
            with smtplib.SMTP("127.0.0.1", topo.smtp_port, timeout=30) as smtp:
                smtp.ehlo("client.example.net")
                assert _mail_reply(smtp, "gone-1") == TEMPFAIL
            topo.wait_postfix_log("Connection refused")
            assert len(topo.sink.wait_for(1)) == 1  # only idle-1 got through
        finally:
            print(topo.logs())
