"""docs/reference/cli.md stays in step with the command: every flag `pymilterkit run --help`
(and `send --help`, `replay --help`) prints has a row in the reference's table for that
subcommand, and every flag in that table is one the command accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference" / "cli.md"
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def help_flags(subcommand: str) -> set[str]:
    """The long flags in the `options:` part of `pymilterkit SUBCOMMAND --help`."""
    done = subprocess.run(
        [sys.executable, "-m", "pymilterkit", subcommand, "--help"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    options = done.stdout.split("\noptions:\n", 1)[1]
    flags = set()
    for line in options.splitlines():
        # an option line: two spaces, then the option strings ("-h, --help", "--verbose, -v")
        match = re.match(r"  (-\S+(?: [^ ,-]\S*)?(?:, -\S+(?: \S+)?)*)", line)
        if match:
            flags |= set(FLAG.findall(match.group(1)))
    return flags - {"--help"}


def documented_flags(subcommand: str) -> set[str]:
    """The flags in the first column of the option table under "## `pymilterkit SUBCOMMAND`"."""
    text = REFERENCE.read_text()
    section = text.split(f"## `pymilterkit {subcommand}`", 1)[1].split("\n## ", 1)[0]
    flags = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            flags |= set(FLAG.findall(line.split("|")[1]))
    return flags


@pytest.mark.parametrize("subcommand", ["run", "send", "replay"])
def test_the_cli_reference_documents_every_flag_and_no_other(subcommand: str) -> None:
    in_help = help_flags(subcommand)
    documented = documented_flags(subcommand)
    assert len(in_help) >= 5  # the parse found the options
    assert in_help - documented == set(), f"in --help, not in {REFERENCE.name}"
    assert documented - in_help == set(), f"in {REFERENCE.name}, not in --help"
