"""CPU affinity of a milter process: by default each process runs on one CPU.

Why: Python code of one process runs on one core at a time (the GIL), but libmilter runs every
callback on one of its pool threads, and consecutive callbacks hop between those threads. Spread
over several CPUs, each hand-over of the GIL between them is a cross-CPU wake-up: measured with
the benchmark filter (8 connections, noreply), a process confined to one CPU served 2.5x the
messages at a third of the CPU per message. pymilter, on the same libmilter, behaves the same.

`auto` confines a single process to one CPU (the highest-numbered it may use) and pre-forked
worker N to the N-th CPU from the top; `None` leaves placement to the scheduler; a list of CPUs
confines a single process to that set and deals its entries out to the workers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Literal, cast

from ._errors import ConfigurationError

__all__ = ["CpuAffinity", "check", "confine", "parse"]

_CPU_LIST = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")

CpuAffinity = Literal["auto"] | Sequence[int] | None


def _allowed() -> list[int] | None:
    getter = getattr(os, "sched_getaffinity", None)
    return None if getter is None else sorted(getter(0))


def check(setting: CpuAffinity) -> CpuAffinity:
    """Validate a `cpu_affinity` setting against the CPUs this process may use."""
    if setting is None or setting == "auto":
        return setting
    if isinstance(setting, str) or not isinstance(setting, Sequence):
        raise ConfigurationError(
            f"cpu_affinity must be 'auto', None or a list of CPU numbers: {setting!r}"
        )
    cpus = list(cast("Sequence[int]", setting))
    if not cpus or not all(isinstance(n, int) and not isinstance(n, bool) for n in cpus):
        raise ConfigurationError(f"cpu_affinity needs at least one CPU number: {setting!r}")
    allowed = _allowed()
    if allowed is None:
        raise ConfigurationError("cpu_affinity lists need os.sched_setaffinity (Linux)")
    outside = sorted(set(cpus) - set(allowed))
    if outside:
        raise ConfigurationError(
            f"CPU(s) {outside} not available to this process (it may use {allowed})"
        )
    return tuple(cpus)


def confine(setting: CpuAffinity, slot: int | None = None) -> set[int] | None:
    """Apply `setting` to the calling thread (threads it starts inherit it); returns the set.

    `slot` is a pre-forked worker's number, None for a single process. Call before libmilter
    starts its threads.
    """
    allowed = _allowed()
    if setting is None or allowed is None:
        return None
    if setting == "auto":
        if len(allowed) == 1:
            return None
        top_down = allowed[::-1]
        cpus = {top_down[0 if slot is None else slot % len(top_down)]}
    else:
        listed = list(setting)
        cpus = set(listed) if slot is None else {listed[slot % len(listed)]}
    os.sched_setaffinity(0, cpus)
    return cpus


def parse(text: str) -> CpuAffinity:
    """The command line's form: `auto`, `none`, or CPUs like `0,2-3`."""
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    if word == "none":
        return None
    if not _CPU_LIST.fullmatch(word):
        raise ConfigurationError(
            f"--cpu-affinity takes auto, none or CPU numbers like 0,2-3: {text!r}"
        )
    cpus: list[int] = []
    for part in word.split(","):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            raise ConfigurationError(f"--cpu-affinity: empty range {part!r}")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus
