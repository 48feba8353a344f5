"""`stage_timeout`: a default and per-stage values, the same from flags, TOML and `Milter`, and
deadlines on by default (issue 28.1)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from typing_extensions import override

from pymilterkit import ConfigurationError, EsmtpParams, Milter, MilterSession, Status
from pymilterkit.__main__ import _parser
from pymilterkit._config import parse_args
from pymilterkit._options import STAGE_DEADLINES, RunOptions, stage_deadlines
from pymilterkit.testing import Harness


def deadlines(argv: list[str]) -> dict[str, float | None]:
    args = parse_args(_parser(), ["run", "x:Y", "--socket", "unix:/tmp/x.sock", *argv])
    return stage_deadlines(RunOptions.from_args(args, None).stage_timeout)


def test_deadlines_are_on_by_default_and_never_shorter_than_what_postfix_waits() -> None:
    table = deadlines([])
    assert table == stage_deadlines(Milter(MilterSession, "unix:/tmp/x.sock").options.stage_timeout)
    for stage in ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_data", "on_unknown"):
        assert table[stage] == 30.0  # milter_command_timeout
    for stage in ("on_header", "on_eoh", "on_body"):
        assert table[stage] == 300.0  # milter_content_timeout
    assert table["on_eom"] == 600.0  # progress keeps Postfix waiting; the client waits 10 min
    assert set(table) == {f"on_{stage}" for stage in STAGE_DEADLINES}


def test_a_default_and_per_stage_values_from_flags_toml_and_milter(tmp_path: Path) -> None:
    expected = {**dict.fromkeys(stage_deadlines(None), 10.0), "on_eom": 60.0}
    assert deadlines(["--stage-timeout", "10", "--stage-timeout", "eom=60"]) == expected
    config = tmp_path / "m.toml"
    config.write_text("stage-timeout = {default = 10, eom = 60}\n")
    assert deadlines(["--config", str(config)]) == expected
    milter = Milter(MilterSession, "unix:/tmp/x.sock", stage_timeout={"default": 10, "eom": 60})
    assert stage_deadlines(milter.options.stage_timeout) == expected
    config.write_text("stage-timeout = 10\n")  # a plain number: every stage
    assert deadlines(["--config", str(config)]) == dict.fromkeys(expected, 10.0)
    # One stage only: the others keep their defaults; 0 turns a deadline off.
    only = deadlines(["--stage-timeout", "rcpt=5", "--stage-timeout", "eom=0"])
    assert only == {**stage_deadlines(None), "on_rcpt": 5.0, "on_eom": None}
    assert set(deadlines(["--stage-timeout", "0"]).values()) == {None}


def test_message_names_the_end_of_message_deadline(tmp_path: Path) -> None:
    # on_message runs in the end-of-message callback, under eom's deadline.
    expected = {**stage_deadlines(None), "on_eom": 60.0}
    assert deadlines(["--stage-timeout", "message=60"]) == expected
    config = tmp_path / "m.toml"
    config.write_text("stage-timeout = {message = 60}\n")
    assert deadlines(["--config", str(config)]) == expected
    milter = Milter(MilterSession, "unix:/tmp/x.sock", stage_timeout={"message": 60, "eom": 60})
    assert stage_deadlines(milter.options.stage_timeout) == expected
    for table in ({"eom": 60, "message": 10}, {"message": 10, "eom": 60}):
        with pytest.raises(ConfigurationError, match="'message' and 'eom' are one deadline"):
            Milter(MilterSession, "unix:/tmp/x.sock", stage_timeout=table)


@pytest.mark.parametrize("bad", [{"eon": 1}, -1, {"eom": "x"}, float("nan"), {"rcpt": True},
                                 float("inf"), 10**400, {"eom": -(10**400)}])
def test_bad_values_are_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="stage_timeout"):
        Milter(MilterSession, "unix:/tmp/x.sock", stage_timeout=bad)  # type: ignore[arg-type]


def test_bad_flags_and_keys_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        deadlines(["--stage-timeout", "eon=3"])
    config = tmp_path / "m.toml"
    config.write_text('stage-timeout = {rcpt = "3"}\n')
    with pytest.raises(ConfigurationError, match="stage-timeout"):
        deadlines(["--config", str(config)])


class _Stage:
    """What `_trampolines._Deadlines` reads and calls of a suspended stage."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.start = time.perf_counter()
        self.due: float | None = None

    def expire(self) -> None:
        self.log.append(self.name)


def test_suspended_stages_expire_in_order_of_their_deadlines_with_one_timer() -> None:
    from pymilterkit._trampolines import _Deadlines

    async def scenario() -> tuple[list[str], int, list[int]]:
        log: list[str] = []
        deadlines = _Deadlines()
        stages = {name: _Stage(name, log) for name in ("a", "b", "c", "done", "d")}
        deadlines.add(stages["a"], 0.20)  # type: ignore[arg-type]
        deadlines.add(stages["b"], 0.05)  # type: ignore[arg-type]
        deadlines.add(stages["done"], 0.05)  # type: ignore[arg-type]
        deadlines.add(stages["c"], 0.10)  # type: ignore[arg-type]
        deadlines.add(stages["d"], 0.05)  # type: ignore[arg-type]
        stages["done"].due = None  # answered in time: what `_finish` does
        loop = asyncio.get_running_loop()
        timers = sum(not t.cancelled() for t in loop._scheduled)  # type: ignore[attr-defined]
        await asyncio.sleep(0.3)
        # A queue with answered stages behind a live one is compacted as it grows.
        live = _Stage("live", log)
        deadlines.add(live, 60.0)  # type: ignore[arg-type]
        for _ in range(5000):
            answered = _Stage("x", log)
            deadlines.add(answered, 60.0)  # type: ignore[arg-type]
            answered.due = None
        sizes = [len(q) for q in deadlines.queues.values()]
        return log, timers, sizes

    log, timers, sizes = asyncio.run(scenario())
    assert log == ["b", "d", "c", "a"]  # "done" was answered: never expired
    assert timers == 1
    assert max(sizes) <= 1025


def test_the_harness_applies_deadlines_as_the_runner_does() -> None:
    class Slow(MilterSession):
        @override
        async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
            await asyncio.sleep(5 if "slow" in recipient else 0)
            return Status.CONTINUE

    for timeout_status in (Status.TEMPFAIL, Status.REJECT):
        harness = Harness(Slow, stage_timeout={"rcpt": 0.05}, timeout_status=timeout_status)
        began = time.monotonic()
        result = harness.run(b"Subject: x\r\n\r\nbody\r\n", recipients=["fast@x", "slow@x"])
        assert time.monotonic() - began < 4
        assert [r.status for r in result.recipients] == [Status.CONTINUE, timeout_status]
    with pytest.raises(ConfigurationError, match="stage_timeout"):
        Harness(Slow, stage_timeout={"rpct": 1})
