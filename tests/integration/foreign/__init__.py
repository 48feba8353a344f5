"""Milters nobody here wrote, run by tests/integration/test_foreign_milters.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# Written by .ci/bootstrap.sh into a venv where `pip install -e '.[pymilter]'` failed: why.
UNBUILDABLE = "pymilter-unbuildable"


def require_pymilter() -> None:
    """Skip a test that needs pymilter where it cannot be built (GCC 15 and newer refuse its C
    source), with the reason bootstrap recorded; fail where nobody tried to install it."""
    if importlib.util.find_spec("Milter") is not None:
        return
    marker = Path(sys.prefix) / UNBUILDABLE
    if marker.exists():
        pytest.skip(f"pymilter does not build here: {marker.read_text().strip()}")
    pytest.fail("pymilter is not installed: pip install -e '.[pymilter]' (.ci/bootstrap.sh "
                "installs it where it builds)", pytrace=False)
