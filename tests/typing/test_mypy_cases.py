"""Filters are mypy-checked: typical mistakes in a filter are caught before it runs.

Each file in `cases/` is a small filter. A `bad_*.py` file marks every line where mypy must
report an error with a trailing `# E: <code>[, <code>...]`; a `good_*.py` file has no marker and
must pass `mypy --strict` with no error and no `type: ignore`. mypy runs once, over all files,
with `--strict`; then, per file, the set of (line, error code) pairs it reports must equal the
set of markers exactly, so an unexpected error fails as much as a missing one.

The errors mypy finds inside pymilterkit itself are not this test's business (the project's
own mypy run covers them): the package is followed silently, its types still apply.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from mypy import api as mypy_api

CASES_DIR = Path(__file__).resolve().parent / "cases"
REPO_ROOT = CASES_DIR.parents[2]
CASE_FILES = sorted(CASES_DIR.glob("*.py"))

MARKER = re.compile(r"#\s*E:\s*(?P<codes>[a-z0-9-]+(?:\s*,\s*[a-z0-9-]+)*)\s*$")
ERROR_LINE = re.compile(
    r"^(?P<path>.+?):(?P<line>\d+): error: (?P<message>.*?)(?:\s+\[(?P<code>[a-z0-9-]+)\])?$"
)

Found = set[tuple[int, str]]


def expected_errors(path: Path) -> Found:
    """The (line, code) pairs marked with `# E: code` in a case file."""
    found: Found = set()
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = MARKER.search(text)
        if match:
            for code in match["codes"].split(","):
                found.add((number, code.strip()))
    return found


class MypyReport:
    """The errors of one mypy run, by case file."""

    def __init__(self, stdout: str, stderr: str, status: int) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.status = status
        self.by_file: dict[Path, Found] = {}
        self.messages: dict[Path, list[str]] = {}
        self.stray: list[str] = []
        for text in stdout.splitlines():
            match = ERROR_LINE.match(text)
            if match is None:
                continue  # notes, the summary line
            path = Path(match["path"])
            if not path.is_absolute():
                path = REPO_ROOT / path
            path = path.resolve()
            if path.parent != CASES_DIR:
                self.stray.append(text)
                continue
            code = match["code"] or "<no code>"
            self.by_file.setdefault(path, set()).add((int(match["line"]), code))
            self.messages.setdefault(path, []).append(text)

    def describe(self, path: Path) -> str:
        return "\n".join(self.messages.get(path, [])) or "(no errors)"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MypyReport]:
    tmp = tmp_path_factory.mktemp("mypy")
    config = tmp / "mypy.ini"
    # A config of our own: the cases must not depend on the project's mypy settings (which
    # exclude them anyway). pymilterkit is found from the checkout, not an installed copy.
    config.write_text(
        "[mypy]\n"
        "strict = True\n"
        "python_version = 3.11\n"
        f"mypy_path = {REPO_ROOT}\n"
        "\n"
        "[mypy-pymilterkit.*]\n"
        "follow_imports = silent\n",
        encoding="utf-8",
    )
    stdout, stderr, status = mypy_api.run(
        [
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp / "cache"),
            "--no-incremental",
            "--show-error-codes",
            "--show-absolute-path",
            "--no-pretty",
            "--no-error-summary",
            "--hide-error-context",
            *(str(path) for path in CASE_FILES),
        ]
    )
    yield MypyReport(stdout, stderr, status)


def test_mypy_ran(report: MypyReport) -> None:
    # 0: no error at all, 1: errors reported; 2 would be a crash or a bad command line.
    assert report.status in (0, 1), f"mypy failed:\n{report.stdout}\n{report.stderr}"
    assert not report.stray, "errors outside the case files:\n" + "\n".join(report.stray)


def test_cases_are_named_and_marked() -> None:
    assert CASE_FILES, f"no case files in {CASES_DIR}"
    for path in CASE_FILES:
        text = path.read_text(encoding="utf-8")
        assert "type: ignore" not in text, f"{path.name}: no `type: ignore` in the cases"
        if path.name.startswith("bad_"):
            assert expected_errors(path), f"{path.name}: a bad_ case needs `# E: <code>` markers"
        elif path.name.startswith("good_"):
            assert not expected_errors(path), f"{path.name}: a good_ case has no error marker"
        else:
            pytest.fail(f"{path.name}: case files are named bad_*.py or good_*.py")


@pytest.mark.parametrize("path", CASE_FILES, ids=[path.stem for path in CASE_FILES])
def test_case(report: MypyReport, path: Path) -> None:
    expected = expected_errors(path)
    reported = report.by_file.get(path, set())
    missing = sorted(expected - reported)
    unexpected = sorted(reported - expected)
    assert not missing and not unexpected, (
        f"{path.name}: mypy --strict disagrees with the `# E:` markers\n"
        f"  expected but not reported (line, code): {missing}\n"
        f"  reported but not expected (line, code): {unexpected}\n"
        f"mypy said:\n{report.describe(path)}"
    )
