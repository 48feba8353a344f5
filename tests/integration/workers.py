"""Finding the pre-forked workers of a milter under test.

A pre-forked milter's socket exists (the parent opens it) a moment before its workers are
forked, so `MilterProcess` may report the milter ready while the workers are still starting:
tests that look at the workers wait for them here.
"""

from __future__ import annotations

import time
from pathlib import Path


def children(parent: int) -> set[int]:
    """The PIDs of `parent`'s child processes right now."""
    return {int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()}


def worker_pids(parent: int, count: int, timeout: float = 10.0) -> list[int]:
    """The PIDs of `parent`'s pre-forked workers, once `count` of them run (bounded wait)."""
    deadline = time.monotonic() + timeout
    found: set[int] = set()
    while time.monotonic() < deadline:
        found = children(parent)
        if len(found) >= count:
            break
        time.sleep(0.05)
    assert len(found) == count, f"expected {count} workers, found {sorted(found)}"
    return sorted(found)
