"""The library's log record of a failing stage, written by the real runner as JSON, carries the
session id, queue id, stage, client address and worker PID."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path

import pytest

from pymilterkit import InetAddress, Status
from pymilterkit.testing import ClientInfo, Envelope, MilterClient, MilterProcess

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_an_error_record_names_session_queue_id_stage_and_pid() -> None:
    client = ClientInfo("mx.example.net", InetAddress(ip_address("198.51.100.9"), 2525))
    with MilterProcess("tests.integration.filters:Faulty", args=["--log-format", "json"],
                       cwd=ROOT) as milter:
        mta = MilterClient(milter.socket, client=client)
        ok = mta.run(b"Subject: 1\r\n\r\nx\r\n",
                     envelope=Envelope.of("a@example.net", ["b@example.org"], queue_id="4Q1"))
        failed = mta.run(b"Subject: 2\r\n\r\nx\r\n", envelope=Envelope.of(
            "a@example.net", ["raise@example.org"], queue_id="4Q2"))
        assert milter.stop() == 0
        lines = milter.log().splitlines()
    assert ok.status is Status.CONTINUE and failed.status is Status.TEMPFAIL
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    errors = [r for r in records if r["level"] == "ERROR"]
    assert len(errors) == 1, lines
    error = errors[0]
    assert error["message"] == "Faulty.on_rcpt raised RuntimeError; answering TEMPFAIL"
    assert error["pid"] == milter.pid
    assert error["session_id"] == f"{milter.pid}-2"  # the second connection of this process
    assert error["queue_id"] == "4Q2"
    assert error["stage"] == "on_rcpt"
    assert error["client"] == "198.51.100.9"
    assert "RuntimeError: boom in on_rcpt\\nwith a second line" in error["exception"]
    started = [r for r in records if "listening on" in r["message"]]
    assert started and started[0]["session_id"] is None


def test_workers_lines_tell_the_workers_apart() -> None:
    with MilterProcess("tests.integration.filters:Faulty",
                       args=["--log-format", "json", "--workers", "2"], cwd=ROOT) as milter:
        mta = MilterClient(milter.socket)
        for n in range(8):
            mta.run(b"Subject: x\r\n\r\nx\r\n", envelope=Envelope.of(
                "a@example.net", ["raise@example.org"], queue_id=f"W{n}"))
        assert milter.stop() == 0
        records = [json.loads(line) for line in milter.log().splitlines()]
    errors = [r for r in records if r["level"] == "ERROR"]
    assert sorted(r["queue_id"] for r in errors) == [f"W{n}" for n in range(8)]
    for error in errors:
        assert error["pid"] != milter.pid  # a worker wrote it, not the supervisor
        assert error["session_id"].startswith(f"{error['pid']}-")
    ids = [r["session_id"] for r in errors]
    assert len(set(ids)) == 8  # unique across both workers


def test_the_filters_own_loggers_follow_log_level() -> None:
    # Not the root's WARNING: a filter's logging.getLogger(__name__).info shows by default;
    # a library's INFO does not (it follows --root-log-level).
    with MilterProcess("tests.integration.ops_filters:ModuleLogs", cwd=ROOT) as milter:
        MilterClient(milter.socket).run(b"Subject: x\r\n\r\nbody\r\n")
        log = milter.log()
    assert "tests.integration.ops_filters[" in log and "filter record from" in log, log
    assert "library record" not in log
    with MilterProcess("tests.integration.ops_filters:ModuleLogs", cwd=ROOT,
                       args=["--log-level", "WARNING"]) as milter:
        MilterClient(milter.socket).run(b"Subject: x\r\n\r\nbody\r\n")
        assert "filter record from" not in milter.log()
