"""What the test filters and the tests of every layer share: each of these is done one way.

The filters (tests/*/filters.py and the other *_filters.py modules, each run in a process of its
own by `pymilterkit run`) read what to do from the conversation (an address's local part, a
`sleep-S` name, $PMK_DELAY) and tell the test what happened through files named by environment
variables. The tests find a pre-forked milter's workers with `worker_pids`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pymilterkit import Actions

EVERY_ACTION = (
    Actions.ADD_HEADER
    | Actions.CHANGE_HEADER
    | Actions.CHANGE_FROM
    | Actions.ADD_RCPT
    | Actions.ADD_RCPT_PAR
    | Actions.DELETE_RCPT
    | Actions.CHANGE_BODY
    | Actions.QUARANTINE
)
"""Every message action a filter can declare."""

MAX_SLEEP = 30.0
"""The longest a `sleep-S` name makes a filter wait, whatever S says."""


def local_part(address: str) -> str:
    """`bob` of `<bob@example.com>` (the whole address, without <>, if it has no @)."""
    return address.strip("<>").split("@", 1)[0]


def requested_sleep(name: str) -> float | None:
    """The seconds a name `sleep-S` asks a filter to wait (at most `MAX_SLEEP`); None for any
    other name. The name is a HELO name, or an address's local part."""
    if not name.startswith("sleep-"):
        return None
    return min(float(name[len("sleep-") :]), MAX_SLEEP)


def delay_from_env(default: float) -> float:
    """The seconds $PMK_DELAY says (`default` without it): how long a filter's stage takes."""
    return float(os.environ.get("PMK_DELAY", default))


def append_line(variable: str, line: str) -> None:
    """Append `line` to the file $`variable` names, if it is set: one O_APPEND write, so the
    lines of concurrent threads and processes do not mix."""
    path = os.environ.get(variable)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


# -- pre-forked workers --------------------------------------------------------------------
# A pre-forked milter's socket exists (the parent opens it) a moment before its workers are
# forked, so `MilterProcess` may report the milter ready while the workers are still starting:
# tests that look at the workers wait for them here.


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
