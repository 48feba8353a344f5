"""CI-sized soak: a few thousand messages of the full mix (see soak.py for the long run)."""

from __future__ import annotations

import pytest

from .soak import Config, run_soak

pytestmark = pytest.mark.integration


def test_soak_small() -> None:
    report = run_soak(Config(messages=4000, connections=8, seed=20240601, big_bodies=1,
                             quiet=True))
    print(report.text())
    assert report.wrong == 0, report.text()
    assert report.crashes == 0, report.text()
    assert report.messages == 4000
    assert report.kinds["delivered"] > 1000 and report.kinds["10MB-body"] == 1
    assert report.ok, report.text()
