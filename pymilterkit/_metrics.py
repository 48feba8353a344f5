"""Metrics of a running milter, summed over pre-forked workers; health for probes.

Theory of operation
-------------------
Counts live in a `_board.Board` (an anonymous memory file) that the socket's owner creates
before it starts workers, one row per serving process. Forked workers inherit it; a fresh
worker (a reload) maps the descriptor it is handed (`fresh_worker`, `attach`). The owner gives
each worker a row just before starting it (`before_fork`), usually a dead one's: counters never
go backwards and nothing counted is lost with a killed worker. Each worker writes only its own
row; the owner zeroes a dead worker's gauges when it reaps it, and its HTTP endpoint
(`_metrics_http`, the only importer of `prometheus_client`) sums the rows. Without `metrics`
none of this exists and the hooks below return at once.

Per-stage figures are counted by the `Meter` on the dispatch path (`SessionRules.meter`): an
answer is one addition to the cell of its status and latency bucket, plus one to the latency
sum; results by status and the histogram are that table's row and column sums.
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ._board import Board
from ._flags import Status
from ._protocol import ACTION as ACTION_BY_METHOD
from ._protocol import ACTIONS as ACTION_TABLE
from ._protocol import STAGE_METHODS, ActionInfo, BackendWrapper, SessionBackend

__all__ = [
    "ACTIONS",
    "BUCKETS",
    "STAGE_NAMES",
    "Meter",
    "attach",
    "before_fork",
    "count_timeout",
    "count_too_big",
    "event_loop",
    "fresh_worker",
    "install",
    "nothing",
    "set_draining",
    "worker_exited",
    "worker_restarted",
    "worker_started",
]

logger = logging.getLogger("pymilterkit")

STAGE_NAMES = STAGE_METHODS
"""Every stage method; the metrics' `stage` label is the name without `on_`."""
STATUSES: tuple[Status, ...] = tuple(Status)
BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Upper bounds (seconds) of the stage latency histogram; +Inf follows."""
ACTIONS: tuple[str, ...] = tuple(dict.fromkeys(info.label for info in ACTION_TABLE))
"""The `action` label: the session API call that reached (or, in dry-run, would reach) the MTA."""

# -- layout of one row (float64 cells) ---------------------------------------------------------
_NS, _NB = len(STATUSES), len(BUCKETS) + 1
# Per stage: the latency sum, then answers by latency bucket and status (a row of _NS statuses
# per bucket, not cumulative), so one addition counts an answer in both its status and its
# bucket; then errors, timeouts and dry-run verdicts by status. The sum and the first bucket's
# row are one cache line (8 cells; stages start on a multiple of 8): a fast answer touches it
# alone.
_SUM, _ANSWERS = 0, 1
_ERRORS = _ANSWERS + _NB * _NS
_TIMEOUTS, _DRY = _ERRORS + 1, _ERRORS + 2
_STAGE_CELLS = -(-(_DRY + _NS) // 8) * 8
assert _NS + 1 <= 8
_STAGE_INDEX = {name: i for i, name in enumerate(STAGE_NAMES)}
_PROCESS = len(STAGE_NAMES) * _STAGE_CELLS  # per process, after the stages:
_SESSIONS_TOTAL, _SESSIONS_ACTIVE, _DRAINING = _PROCESS, _PROCESS + 1, _PROCESS + 2
_ACTIONS = _PROCESS + 3
_DRY_ACTIONS = _ACTIONS + len(ACTIONS)
_TOO_BIG = _DRY_ACTIONS + len(ACTIONS)
_LOOP_RESTARTS = _TOO_BIG + 1  # the event loop run again after it stopped
_LOOP_DOWN = _LOOP_RESTARTS + 1  # gauge: the event loop cannot serve async stages
_ROW = 2048  # cells: 16 KiB, 4 pages per process
assert _LOOP_DOWN < _ROW
_ACTION_INDEX = {name: i for i, name in enumerate(ACTIONS)}


def stage_label(stage: str) -> str:
    """`on_rcpt` -> `rcpt`."""
    return stage.removeprefix("on_")


# -- the address ----------------------------------------------------------------------------


# -- the shared map ---------------------------------------------------------------------------


class SharedCounts(Board):
    """The shared map (`_board.Board`): `rows` rows of `_ROW` cells for serving processes,
    one for the owner. Without `fd` a new one; with `fd`, the owner's, inherited."""

    def __init__(self, rows: int, fd: int | None = None) -> None:
        super().__init__(rows, _ROW, fd, name="pymilterkit-metrics")

    def zero_gauges(self, index: int) -> None:
        base = index * _ROW
        self.cells[base + _SESSIONS_ACTIVE] = 0.0
        self.cells[base + _DRAINING] = 0.0
        self.cells[base + _LOOP_DOWN] = 0.0


_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()
"""False on a free-threaded interpreter (3.13t): additions then take a lock."""
# Status value -> its row of buckets in a stage's answers; SMFIS_* values are 0..8 with gaps.
_STATUS_CELL = tuple(
    STATUSES.index(Status(v)) if v in Status._value2member_map_ else 0
    for v in range(max(STATUSES) + 1)
)
_ANSWER_CELL = tuple(_ANSWERS + cell for cell in _STATUS_CELL)
"""Status value -> the cell of its answers in the first latency bucket, from a stage's base."""


class Recorder:
    """A serving process's writer into its row of the shared map.

    Under the GIL an addition to a cell (`cells[i] += x`: C-level subscripts and a float
    addition, no call in between) cannot interleave with another thread's: the interpreter
    switches threads only at calls and backward jumps. Without a GIL (free-threaded builds)
    every addition takes the lock.
    """

    def __init__(self, shared: SharedCounts, row: int) -> None:
        self.cells = shared.cells
        self.base = shared.row(row)
        self.lock = threading.Lock()

    def stage_base(self, stage: str) -> int:
        return self.base + _STAGE_INDEX.get(stage, 0) * _STAGE_CELLS

    def add(self, cell: int, amount: float = 1.0) -> None:
        """Add to cell `cell` of this row (thread-safe)."""
        if _GIL:
            self.cells[self.base + cell] += amount
        else:
            with self.lock:
                self.cells[self.base + cell] += amount

    def stage_count(self, stage: str, cell: int) -> None:
        if stage in _STAGE_INDEX:
            self.add(_STAGE_INDEX[stage] * _STAGE_CELLS + cell)

    def action(self, kind: str, dry: bool = False) -> None:
        self.add((_DRY_ACTIONS if dry else _ACTIONS) + _ACTION_INDEX[kind])

    def dry_verdict(self, stage: str, status: int) -> None:
        self.stage_count(stage, _DRY + _STATUS_CELL[status])

    def record(self, stage: str, answer: int, elapsed: float) -> None:
        """Count one answer of `stage` that took `elapsed` seconds (an async stage's)."""
        base = self.stage_base(stage)
        with self.lock:
            bucket = bisect.bisect_left(BUCKETS, elapsed)
            self.cells[base + _ANSWER_CELL[answer] + bucket * _NS] += 1.0
            self.cells[base + _SUM] += elapsed


# -- this process's state -------------------------------------------------------------------

_shared: SharedCounts | None = None
"""The map (in the owner, and inherited by each worker)."""
_row = 0
"""The row of this process (a worker inherits the one `before_fork` chose)."""
_recorder: Recorder | None = None
"""This serving process's writer, once it serves with metrics."""
_owner: Owner | None = None
"""In the owner process: rows in use, workers, the HTTP endpoint."""


class Owner:
    """The owner's bookkeeping: which worker has which row, how many are alive, restarts."""

    def __init__(self, shared: SharedCounts) -> None:
        self.shared = shared
        self.pid = os.getpid()
        self.rows: dict[int, int] = {}  # pid -> row
        self.restarts = 0
        self.draining = False
        self.server: Any = None  # _metrics_http.MetricsServer

    @property
    def alive(self) -> int:
        return len(self.rows)

    def free_row(self) -> int:
        used = set(self.rows.values())
        for row in range(self.shared.rows):
            if row not in used:
                return row
        logger.error("metrics: more workers than rows; a worker shares the last row")
        return self.shared.rows - 1

    def healthy(self) -> tuple[bool, str]:
        """(serving?, why): 503 while draining or with no live worker."""
        cells = self.shared.cells
        if self.draining or cells[self.shared.row(self.shared.owner_row) + _DRAINING]:
            return False, "draining"
        if not self.rows:
            return False, "no live worker"
        if any(cells[self.shared.row(row) + _LOOP_DOWN] for row in range(self.shared.rows)):
            return False, "event loop down"
        if all(cells[self.shared.row(row) + _DRAINING] for row in list(self.rows.values())):
            return False, "draining"
        return True, "serving"


def install(owner: Owner) -> Callable[[], None]:
    """Make `owner` (with its shared map) this process's metrics; returns the uninstall."""
    global _shared, _owner, _row
    _shared, _owner, _row = owner.shared, owner, 0
    _ForkHook.register()

    def uninstall() -> None:
        global _shared, _owner, _recorder
        _shared = _owner = _recorder = None

    return uninstall


def nothing() -> None:
    """The stop of metrics that were never started."""


def recorder() -> Recorder | None:
    """This serving process's recorder (created on first use), or None without metrics."""
    global _recorder
    if _shared is None:
        return None
    if _recorder is None:
        _recorder = Recorder(_shared, _row)
    return _recorder


# -- hooks for the supervisor, the drain and stage deadlines (no-ops without metrics) -----------


def before_fork() -> None:
    """Supervisor, just before forking a worker: choose the row the child inherits."""
    global _row
    if _owner is not None:
        _row = _owner.free_row()


def fresh_worker() -> str | None:
    """Supervisor, after `before_fork`, before starting a worker as a fresh interpreter (a
    reload): what to hand it (`attach`) so it maps the counts; None without metrics. The
    memory file's descriptor is made inheritable for it."""
    shared = _shared
    if shared is None or _owner is None:
        return None
    os.set_inheritable(shared.fd, True)
    return f"{shared.fd}:{_row}:{shared.rows}"


def attach(handed: str | None) -> None:
    """In a worker started as a fresh interpreter: map the counts `fresh_worker` handed it."""
    global _shared, _row
    if handed is None:
        return
    fd, row, rows = (int(part) for part in handed.split(":"))
    if os.fstat(fd).st_size != (rows + 1) * _ROW * 8:
        # The supervisor runs another pymilterkit version (upgraded, then reloaded), whose map
        # has another layout: count into a map of this worker's own rather than crash or
        # write garbage into the shared one.
        logger.warning(
            "metrics: the supervisor's pymilterkit has another layout of the counts; this "
            "worker's counts are not shown (restart the milter to show them again)"
        )
        os.close(fd)
        _shared, _row = SharedCounts(rows), row
        _ForkHook.register()
        return
    _shared, _row = SharedCounts(rows, fd=fd), row
    _ForkHook.register()


def worker_started(pid: int) -> None:
    """Supervisor, after forking worker `pid` (the row chosen by `before_fork`)."""
    owner = _owner
    if owner is not None and os.getpid() == owner.pid:
        owner.rows[pid] = _row


def worker_exited(pid: int) -> None:
    """Supervisor, after reaping worker `pid`: its row is free, its gauges zero."""
    owner = _owner
    if owner is not None and os.getpid() == owner.pid:
        row = owner.rows.pop(pid, None)
        if row is not None:
            owner.shared.zero_gauges(row)


def worker_restarted() -> None:
    """Supervisor: a worker died and a new one is started in its place (counted)."""
    owner = _owner
    if owner is not None:
        owner.restarts += 1


def set_draining() -> None:
    """This process drains (takes no new connections): `/healthz` answers 503.

    In the supervisor (or the single process) the whole milter is draining; in a worker, that
    worker is (503 once no live worker is left that is not draining). Safe from any thread.
    """
    shared = _shared
    if shared is None:
        return
    owner = _owner
    if owner is not None and os.getpid() == owner.pid:
        owner.draining = True
        shared.cells[shared.row(shared.owner_row) + _DRAINING] = 1.0
    else:
        shared.cells[shared.row(_row) + _DRAINING] = 1.0


def event_loop(restarted: bool) -> None:
    """This process's event loop was run again after it stopped (`restarted`), or cannot
    run: counted, and `/healthz` fails while it is down. Safe from any thread."""
    rec = recorder()
    if rec is not None:
        if restarted:
            rec.add(_LOOP_RESTARTS)
        else:
            rec.cells[rec.base + _LOOP_DOWN] = 1.0


def count_timeout(stage: str) -> None:
    """A stage ran past its deadline (`stage_timeout`): count it. Safe from any thread."""
    rec = recorder()
    if rec is not None:
        rec.stage_count(stage, _TIMEOUTS)


def count_too_big() -> None:
    """A message past max_message_size was not given to on_message. Safe from any thread."""
    rec = recorder()
    if rec is not None:
        rec.add(_TOO_BIG)


def _in_child() -> None:
    """After fork, in the child: the HTTP endpoint and worker table are the parent's."""
    global _owner, _recorder
    owner = _owner
    if owner is not None:
        if owner.server is not None:
            owner.server.forget()  # close the inherited listening socket, here only
        _owner = None
    _recorder = None  # the parent's lock is not this process's


class _ForkHook:
    """`_in_child` runs after every fork once this process has metrics (not at import)."""

    registered = False

    @classmethod
    def register(cls) -> None:
        if not cls.registered:
            cls.registered = True
            os.register_at_fork(after_in_child=_in_child)


# -- the callbacks ------------------------------------------------------------------------------


class CountingBackend(BackendWrapper):
    """A session backend that carries each action out, then counts it by its label."""

    __slots__ = ("add", "cells", "header_cell")

    def __init__(self, inner: SessionBackend, rec: Recorder) -> None:
        super().__init__(inner)
        self.add = rec.add
        self.cells = rec.cells
        self.header_cell = rec.base + _ACTIONS + _ACTION_INDEX["add_header"]

    def act(self, action: ActionInfo, *args: Any) -> None:
        self.perform(action, *args)
        self.add(_ACTIONS + _ACTION_INDEX[action.label])

    def add_header(self, name: bytes, value: bytes) -> None:
        if not _GIL:
            self.act(ACTION_BY_METHOD["add_header"], name, value)
            return
        self.inner.add_header(name, value)  # the action of most messages: counted inline,
        self.cells[self.header_cell] += 1.0  # as `Recorder.add` does under the GIL


class Meter:
    """Metrics' part in the dispatch path (`SessionRules.meter`): counts stage answers and
    their latency, errors, timeouts, sessions and (through `CountingBackend`) actions."""

    def __init__(self, rec: Recorder, clock: Callable[[], float] = time.perf_counter) -> None:
        self.rec = rec
        self.clock = clock

    def timed(self, stage: str, callback: Callable[..., int]) -> Callable[..., int]:
        """`callback` (a sync stage's), counting each answer it returns by status and latency.

        Under the GIL an addition to a cell cannot interleave with another thread's (see
        `Recorder`); without it, the lock.
        """
        base = self.rec.stage_base(stage)
        first = tuple(base + cell for cell in _ANSWER_CELL)  # by status value
        cells, total, fast, bounds = self.rec.cells, base + _SUM, BUCKETS[0], BUCKETS
        clock, where, lock, gil = self.clock, bisect.bisect_left, self.rec.lock, _GIL

        def metered(key: Any, a: Any = None, b: Any = None) -> int:
            start = clock()
            answer = callback(key, a, b)
            try:
                elapsed = clock() - start
                if elapsed <= fast:
                    cell = first[answer]
                else:
                    cell = first[answer] + where(bounds, elapsed) * _NS
                if gil:
                    cells[cell] += 1.0
                    cells[total] += elapsed
                else:
                    with lock:
                        cells[cell] += 1.0
                        cells[total] += elapsed
            except Exception:  # noqa: BLE001 - nothing may reach C; a count is not worth it
                pass
            return answer

        return metered

    def record(self, stage: str, answer: int, elapsed: float) -> None:
        """Count an async stage's answer."""
        self.rec.record(stage, answer, elapsed)

    def error(self, stage: str) -> None:
        self.rec.stage_count(stage, _ERRORS)

    def timeout(self, stage: str) -> None:
        self.rec.stage_count(stage, _TIMEOUTS)

    def backend(self, inner: SessionBackend) -> SessionBackend:
        """A new session's backend, counting its actions."""
        return CountingBackend(inner, self.rec)

    def opened(self) -> None:
        self.rec.add(_SESSIONS_TOTAL)
        self.rec.add(_SESSIONS_ACTIVE)

    def closed(self) -> None:
        self.rec.add(_SESSIONS_ACTIVE, -1.0)


def meter() -> Meter:
    """This serving process's meter (metrics must have been started)."""
    rec = recorder()
    if rec is None:
        raise RuntimeError("metrics are not started in this process")
    return Meter(rec)


# -- reading (the owner's HTTP endpoint) ----------------------------------------------------------


def snapshot(shared: SharedCounts) -> dict[str, Any]:
    """Every figure summed over the rows: what `/metrics` shows."""
    # One pass over the map: every cell summed over the rows (a scrape holds the GIL).
    cells = shared.cells
    rows = [cells[r * _ROW : (r + 1) * _ROW].tolist() for r in range(shared.rows)]
    sums = list(map(sum, zip(*rows, strict=True)))
    total = sums.__getitem__
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGE_NAMES:
        base = _STAGE_INDEX[stage] * _STAGE_CELLS
        start, stop = base + _ANSWERS, base + _ANSWERS + _NB * _NS
        answers = [sums[start + i : stop : _NS] for i in range(_NS)]  # by status, then bucket
        stages[stage] = {
            "results": {s.name.lower(): sum(answers[i]) for i, s in enumerate(STATUSES)},
            "buckets": [sum(column) for column in zip(*answers, strict=True)],
            "sum": total(base + _SUM),
            "errors": total(base + _ERRORS),
            "timeouts": total(base + _TIMEOUTS),
            "dry_run": {
                s.name.lower(): total(base + _DRY + i) for i, s in enumerate(STATUSES)
            },
        }
    return {
        "stages": stages,
        "sessions_total": total(_SESSIONS_TOTAL),
        "sessions_active": total(_SESSIONS_ACTIVE),
        "actions": {a: total(_ACTIONS + i) for i, a in enumerate(ACTIONS)},
        "dry_run_actions": {a: total(_DRY_ACTIONS + i) for i, a in enumerate(ACTIONS)},
        "too_big": total(_TOO_BIG),
        "loop_restarts": total(_LOOP_RESTARTS),
    }

