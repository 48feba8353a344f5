"""Postfix -> HAProxy (TCP mode) -> three pymilterkit instances: spread, failover, rolling restart.

The topology is built by `tests/e2e/haproxy.py` (see its docstring): a throwaway Postfix whose
only milter is HAProxy on 127.0.0.1, three `pymilterkit run` instances on 127.0.0.2-4 standing
for three hosts, HAProxy health-checking them, and an LMTP sink collecting what Postfix
delivers. Every delivered message is checked for the filter's header; every message the client
sent is accounted for (delivered, or refused with the code the test expects). Counts and times
are printed (``-s``); `benchmarks/haproxy_fleet.py` measures them with more messages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from .haproxy import Load, Topology, check_deliveries, failover, rolling_restart

pytestmark = pytest.mark.e2e


@pytest.fixture
def topology(postfix_factory: object) -> Iterator[Topology]:
    """Sink, three instances (TCP health checks), HAProxy and Postfix; logs shown on failure."""
    _ = postfix_factory  # (its root check; the Postfix here is the topology's own)
    with Topology() as topo:
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
