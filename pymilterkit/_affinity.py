"""CPU affinity of a milter process: by default each process runs on one CPU.

Why: Python code of one process runs on one core at a time (the GIL), but libmilter runs every
callback on one of its pool threads, and consecutive callbacks hop between those threads. Spread
over several CPUs, each hand-over of the GIL between them is a cross-CPU wake-up: measured with
the benchmark filter (8 connections), a process confined to one CPU served 2.6x the messages
with no-reply stages and 1.3x with answered ones, at 0.28-0.55 of the CPU per message. pymilter,
on the same libmilter, behaves the same.

`auto` gives each process (a single one, or each pre-forked worker, each a different one) one
CPU: those the fewest other processes are confined to first (so several milters on one host do
not pile onto one CPU), the highest-numbered on a tie. `None` leaves placement to the scheduler;
a list of CPUs confines a single process to that set and deals its entries out to the workers.
"""

from __future__ import annotations

import os
import re
import reprlib
from collections.abc import Sequence
from typing import Literal, cast

from ._errors import ConfigurationError

__all__ = ["CpuAffinity", "check", "confine", "confined_elsewhere", "parse", "plan"]

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
            f"cpu_affinity must be 'auto', None or a list of CPU numbers: {reprlib.repr(setting)}"
        )
    cpus = list(cast("Sequence[int]", setting))
    if not cpus or not all(isinstance(n, int) and not isinstance(n, bool) for n in cpus):
        raise ConfigurationError(
            f"cpu_affinity needs at least one CPU number: {reprlib.repr(setting)}"
        )
    allowed = _allowed()
    if allowed is None:
        raise ConfigurationError("cpu_affinity lists need os.sched_setaffinity (Linux)")
    outside = sorted(set(cpus) - set(allowed))
    if outside:
        raise ConfigurationError(
            f"CPU(s) {_ranges(outside)} not available to this process (it may use "
            f"{_ranges(allowed)})"
        )
    return tuple(cpus)


def _ranges(cpus: Sequence[int]) -> str:
    """CPU numbers as a short list: `0,2-5,9` (at most 8 runs shown)."""
    runs: list[list[int]] = []
    for n in sorted(cpus):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    shown = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:8])
    return shown + (f",... ({len(cpus)} CPUs)" if len(runs) > 8 else "")


def confined_elsewhere(cpus: Sequence[int]) -> dict[int, int]:
    """For each CPU, how many other processes are confined to it alone (from /proc)."""
    counts = dict.fromkeys(cpus, 0)
    me = str(os.getpid())
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit() and e.name != me]
    except OSError:
        return counts
    for pid in entries:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        value = line.split(":", 1)[1].strip()
                        if value.isdigit() and int(value) in counts:
                            counts[int(value)] += 1
                        break
        except OSError:  # the process ended meanwhile
            continue
    return counts


def plan(setting: CpuAffinity, workers: int | None = None) -> list[set[int]] | None:
    """The CPUs of each process: one set for a single process (`workers` None), else one per
    worker slot; None when there is nothing to confine."""
    allowed = _allowed()
    if setting is None or allowed is None:
        return None
    if setting != "auto":
        listed = list(setting)
        return [set(listed)] if workers is None else [{listed[i % len(listed)]} for i in
                                                      range(workers)]
    if len(allowed) == 1:
        return None
    # Least taken first, highest-numbered on a tie; workers get distinct CPUs until they wrap.
    load = confined_elsewhere(allowed)
    order = sorted(allowed, key=lambda n: (load[n], -n))
    return [{order[i % len(order)]} for i in range(workers or 1)]


def confine(cpus: set[int]) -> None:
    """Confine the calling thread, and every thread it starts from now on, to `cpus`."""
    os.sched_setaffinity(0, cpus)


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
