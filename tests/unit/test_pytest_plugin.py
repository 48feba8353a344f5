"""The pytest plugin: its fixtures, and the worked example in examples/ run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from examples.rcpt_count import RcptCount
from pymilterkit import Status
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
