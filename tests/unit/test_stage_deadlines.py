"""`stage_timeout`: a default and per-stage values, the same from flags, TOML and `Milter`, and
deadlines on by default (issue 28.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymilterkit import ConfigurationError, Milter, MilterSession
from pymilterkit.__main__ import _parser
from pymilterkit._config import parse_args
from pymilterkit._options import STAGE_DEADLINES, RunOptions, stage_deadlines


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


@pytest.mark.parametrize("bad", [{"eon": 1}, -1, {"eom": "x"}, float("nan"), {"rcpt": True}])
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
