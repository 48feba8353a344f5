"""The shipped service unit is hardened: `systemd-analyze security` rates it 3.0 or better."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "pymilterkit@.service"
pytestmark = pytest.mark.integration


def _exposure(unit: Path) -> float:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: .ci/bootstrap.sh installs systemd"
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found[1])


def test_the_shipped_unit_is_rated_3_or_better(tmp_path: Path) -> None:
    assert _exposure(UNIT) <= 3.0


def test_the_rating_sees_the_hardening(tmp_path: Path) -> None:
    # The check is real: the same unit without its hardening lines is rated far worse.
    bare = tmp_path / UNIT.name
    keep = ("Type", "ExecStart", "User", "Group", "Description", "[")
    bare.write_text("".join(
        line for line in UNIT.read_text().splitlines(keepends=True)
        if line.startswith(keep) or not line.strip() or line.startswith(("#", " "))
    ))
    assert _exposure(bare) > 5.0
