"""cpu_affinity: validation, the command line's form, and what `confine` applies."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from examples.rcpt_count import RcptCount
from pymilterkit import ConfigurationError, Milter
from pymilterkit import _affinity as affinity
from pymilterkit._affinity import check, confine, confined_elsewhere, parse, plan

ALLOWED = sorted(os.sched_getaffinity(0))


def in_thread(func: Callable[[], Any]) -> tuple[Any, set[int]]:
    """Run `func` on a new thread (affinity is per thread); its result and the thread's CPUs."""
    out: list[tuple[Any, set[int]]] = []
    thread = threading.Thread(target=lambda: out.append((func(), os.sched_getaffinity(0))))
    thread.start()
    thread.join(10)
    return out[0]


@pytest.mark.parametrize("setting", ["auto", None, [ALLOWED[0]], (ALLOWED[-1],)])
def test_valid_settings_pass(setting: Any) -> None:
    checked = check(setting)
    assert checked == (tuple(setting) if isinstance(setting, (list, tuple)) else setting)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("fast", "must be 'auto', None or a list"),
        (3, "must be 'auto', None or a list"),
        ([], "at least one CPU"),
        ([True], "at least one CPU"),
        (["0"], "at least one CPU"),
        ([4096], "not available to this process"),
    ],
)
def test_invalid_settings_are_refused_by_milter(setting: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Milter(RcptCount, "unix:/tmp/pmk-affinity.sock", cpu_affinity=setting)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), ("none", None), ("1", [1]), ("0,2-3", [0, 2, 3])],
)
def test_parse_command_line_forms(text: str, expected: Any) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize("text", ["", "a", "1-", "1,,2", "-1", "3-1x"])
def test_parse_refuses_garbage(text: str) -> None:
    with pytest.raises(ConfigurationError, match="auto, none or CPU numbers"):
        parse(text)


def test_none_plans_nothing() -> None:
    assert plan(None) is None
    assert plan(None, 4) is None


def no_other_pins(monkeypatch: pytest.MonkeyPatch, load: dict[int, int] | None = None) -> None:
    monkeypatch.setattr(
        affinity, "confined_elsewhere", lambda cpus: {n: (load or {}).get(n, 0) for n in cpus}
    )


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs")
def test_auto_single_process_takes_the_highest_cpu_when_none_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_other_pins(monkeypatch)
    assert plan("auto") == [{ALLOWED[-1]}]


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs")
def test_auto_avoids_cpus_other_processes_are_confined_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_other_pins(monkeypatch, {ALLOWED[-1]: 1})
    assert plan("auto") == [{ALLOWED[-2]}]


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs")
def test_auto_deals_workers_out_by_load_and_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    no_other_pins(monkeypatch)
    top_down = ALLOWED[::-1]
    slots = len(ALLOWED) + 1
    assert plan("auto", slots) == [{top_down[i % len(ALLOWED)]} for i in range(slots)]


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs")
def test_auto_gives_workers_distinct_cpus_even_when_one_is_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_other_pins(monkeypatch, {ALLOWED[0]: 5})
    planned = plan("auto", 2)
    assert planned is not None
    assert planned[0] != planned[1]
    assert planned[0] == {ALLOWED[-1]}


def test_a_list_confines_a_process_to_the_set_and_a_worker_to_one_entry() -> None:
    listed = tuple(ALLOWED[:2])
    assert plan(listed) == [set(listed)]
    assert plan(listed, 3) == [{listed[i % len(listed)]} for i in range(3)]


def test_auto_on_one_cpu_plans_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {ALLOWED[0]})
    assert plan("auto") is None


def test_confine_applies_to_the_calling_thread_only() -> None:
    cpu = ALLOWED[-1]
    assert in_thread(lambda: confine({cpu})) == (None, {cpu})
    assert os.sched_getaffinity(0) == set(ALLOWED)


def test_confined_elsewhere_counts_single_cpu_processes() -> None:
    cpu = ALLOWED[-1]
    before = confined_elsewhere(ALLOWED)[cpu]
    code = f"import os, time; os.sched_setaffinity(0, {{{cpu}}}); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while confined_elsewhere(ALLOWED)[cpu] < before + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert confined_elsewhere(ALLOWED)[cpu] >= before + 1
    finally:
        child.kill()
        child.wait()
