"""The README's first command runs the demo: it must show the header the filter added."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_demo_prints_the_added_header() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "added header ->  X-Rcpt-Count: 3" in result.stdout
    delivered = result.stdout.split("the message as the MTA would deliver it:")[1]
    assert "Subject: Lunch on Friday?\nX-Rcpt-Count: 3\n\nHi all" in delivered
