"""The pytest plugin: its fixtures, and the worked example in examples/ run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from examples.rcpt_count import RcptCount
from pymilterkit import MilterError, Status
from pymilterkit.testing._process import filter_table
from pymilterkit.testing.pytest_plugin import HarnessFactory, ProcessFactory, _target

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"Subject: x\r\n\r\nbody\r\n"


def test_harness_fixture_reraises_by_default(milter_harness: HarnessFactory) -> None:
    harness = milter_harness(RcptCount)
    assert harness.reraise
    assert harness.run(MESSAGE).header("X-Rcpt-Count") == "1"
    assert not milter_harness(RcptCount, reraise=False).reraise


def test_process_fixture_runs_the_real_runner(milter_process: ProcessFactory) -> None:
    client = milter_process("examples.rcpt_count:RcptCount")
    result = client.run(MESSAGE, recipients=["a@x", "b@x", "c@x"])
    assert (result.status, result.header("X-Rcpt-Count")) == (Status.CONTINUE, "3")


def test_process_target_must_be_importable() -> None:
    assert _target(RcptCount) == "examples.rcpt_count:RcptCount"

    class Local(RcptCount):
        pass

    with pytest.raises(ValueError, match="cannot be imported"):
        _target(Local)


def test_worked_example_passes() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "examples/test_rcpt_count.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout


def test_process_fixture_passes_the_filters_settings(milter_process: ProcessFactory) -> None:
    from examples.routing import RoutingConfig

    config = RoutingConfig(archive={"boss@example.org": "copy@example.org"},
                           drop_local_parts=frozenset({"bounce"}),
                           sender_domains={"old.example": "new.example"})
    client = milter_process("examples.routing:Routing", config=config, cwd=ROOT)
    result = client.run(MESSAGE, sender="a@old.example",
                        recipients=["boss@example.org", "bounce@example.org"])
    assert result.sender_change is not None
    assert result.sender_change.sender.strip("<>") == "a@new.example"
    assert [r.recipient.strip("<>") for r in result.recipients_added] == ["copy@example.org"]
    assert [r.recipient.strip("<>") for r in result.recipients_removed] == ["bounce@example.org"]
    # a mapping works too, and a key the filter does not have is the usual config error
    with pytest.raises(MilterError, match="drop_localparts"):
        milter_process("examples.routing:Routing", config={"drop_localparts": ["x"]}, cwd=ROOT)


def test_filter_table_round_trips_through_toml() -> None:
    import tomllib

    table = {"name": 'quo"te\n', "n": 3, "x": 0.5, "on": True, "items": ["a", "b"],
             "map": {"k": "v"}, "inf": float("inf")}
    assert tomllib.loads(filter_table(table)) == {"filter": table}
    with pytest.raises(TypeError, match="object has no TOML form"):
        filter_table({"bad": object()})


def test_status_prints_its_name() -> None:
    assert str(Status.TEMPFAIL) == "TEMPFAIL"
    assert f"{Status.REJECT}" == "REJECT"
    assert int(Status.TEMPFAIL) == 4  # still the integer libmilter takes
