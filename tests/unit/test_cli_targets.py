"""A mistyped filter target ends in one line and exit 2 (a config error, not restarted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(target: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pymilterkit", "run", target,
         "--socket", f"unix:{tmp_path}/m.sock"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_a_filter_file_that_does_not_exist(tmp_path: Path) -> None:
    result = _run(f"{tmp_path}/rcptverfy.py:RcptVerify", tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pymilterkit: error: no such filter file: {tmp_path}/rcptverfy.py (in {ROOT})"
    ]
    assert not (tmp_path / "m.sock").exists()


def test_a_class_typo_suggests_the_class(tmp_path: Path) -> None:
    result = _run("examples.rcpt_count:RcptCont", tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pymilterkit: error: examples.rcpt_count has no 'RcptCont'; did you mean 'RcptCount'?"
    ]


def test_a_far_off_name_lists_the_filters(tmp_path: Path) -> None:
    result = _run("examples.mixins:Nothing", tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("pymilterkit: error: examples.mixins has no 'Nothing'; its "
                           "MilterSession classes: ")
    assert "AuditedTagger" in line and "'MilterSession'" not in line


def test_with_json_logs_the_error_line_is_json_too(tmp_path: Path) -> None:
    import json

    for extra in (["--config", "/dev/zero"], ["--socket", f"unix:{tmp_path}/no/such/m.sock"]):
        result = subprocess.run(
            [sys.executable, "-m", "pymilterkit", "run", "examples.rcpt_count:RcptCount",
             "--log-format", "json", "--socket", f"unix:{tmp_path}/m.sock", *extra],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert result.returncode == 2, result.stderr
        records = [json.loads(line) for line in result.stderr.splitlines()]
        assert records and records[-1]["level"] == "ERROR", result.stderr
        assert records[-1]["message"].startswith("error: ")
    result = _run("examples.rcpt_count:RcptCont", tmp_path)  # text stays text
    assert result.stderr.startswith("pymilterkit: error: ")


@pytest.mark.parametrize(
    ("source", "line", "error"),
    [
        ("X = 1\ndef broken(:\n", 2, "SyntaxError: invalid syntax"),
        ("import os\nraise RuntimeError('no database at ' + os.sep)\n", 2,
         "RuntimeError: no database at /"),
        ("import no_such_dependency_pmk\n", 1,
         "ModuleNotFoundError: No module named 'no_such_dependency_pmk'"),
    ],
)
@pytest.mark.parametrize("by_path", [False, True])
def test_a_filter_module_that_raises_on_import_is_a_usage_error(
    tmp_path: Path, source: str, line: int, error: str, by_path: bool
) -> None:
    """Exit 2 (the shipped unit does not restart it) and one line: the file, the line, the
    exception; the traceback only at DEBUG."""
    module = tmp_path / "brokenfilter.py"
    module.write_text(source)
    name = f"{module}" if by_path else "brokenfilter"
    command = [sys.executable, "-m", "pymilterkit", "run", f"{name}:Filter",
               "--socket", f"unix:{tmp_path}/m.sock"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"pymilterkit: error: cannot import {name!r} ({module}, line {line}): {error}"
    ]
    debug = subprocess.run([*command[:3], "--log-level", "DEBUG", *command[3:]],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1] == result.stderr.splitlines()[0]
