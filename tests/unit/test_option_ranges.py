"""Numbers are checked against what libmilter and the OS take: no silent truncation, no NaN."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymilterkit.__main__ import main
from pymilterkit._options import C_INT_MAX


def _config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> str:
    config = tmp_path / "m.toml"
    config.write_text(f'target = "examples.rcpt_count:RcptCount"\n{text}\n')
    code = main(["run", "--config", str(config), "--socket", f"unix:{tmp_path}/m.sock"])
    _, err = capsys.readouterr()
    assert code == 2, err
    (line,) = err.splitlines()
    assert len(line) < 400
    assert not (tmp_path / "m.sock").exists()
    return line


@pytest.mark.parametrize(("text", "says"), [
    ("timeout = 4294967298", f"from 1 to {C_INT_MAX}"),
    ("backlog = 2147483648", f"from 1 to {C_INT_MAX}"),
    ("debug-level = 99999999999", f"from 0 to {C_INT_MAX}"),
    ("max-worker-rss = nan", "positive number"),
    ("max-worker-rss = inf", "positive number"),
    ("stage-timeout = nan", "not a number of seconds"),
    ('cpu-affinity = "0-99999"', "not available to this process"),
])
def test_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    assert says in _config_error(tmp_path, capsys, text)


def test_the_largest_c_int_is_taken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pymilterkit._options import RunOptions

    options = RunOptions(socket=f"unix:{tmp_path}/m.sock", timeout=C_INT_MAX, backlog=C_INT_MAX)
    assert (options.timeout, options.backlog) == (C_INT_MAX, C_INT_MAX)
