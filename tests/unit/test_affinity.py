"""cpu_affinity: validation, the command line's form, and what `confine` applies."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from examples.rcpt_count import RcptCount
from pymilterkit import ConfigurationError, Milter
from pymilterkit._affinity import check, confine, parse

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


def test_none_changes_nothing() -> None:
    assert in_thread(lambda: confine(None)) == (None, set(ALLOWED))


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs")
def test_auto_single_process_takes_the_highest_cpu() -> None:
    top = ALLOWED[-1]
    assert in_thread(lambda: confine("auto")) == ({top}, {top})


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs")
def test_auto_deals_workers_out_from_the_top_and_wraps() -> None:
    top_down = ALLOWED[::-1]
    for slot in range(len(ALLOWED) + 1):
        cpu = top_down[slot % len(ALLOWED)]
        assert in_thread(functools.partial(confine, "auto", slot)) == ({cpu}, {cpu})


def test_a_list_confines_a_process_to_the_set_and_a_worker_to_one_entry() -> None:
    listed = tuple(ALLOWED[:2])
    assert in_thread(lambda: confine(listed)) == (set(listed), set(listed))
    assert in_thread(lambda: confine(listed, 1)) == ({listed[-1]}, {listed[-1]})


def test_auto_on_one_cpu_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {ALLOWED[0]})
    assert confine("auto") is None


def test_parse_refuses_an_empty_range() -> None:
    with pytest.raises(ConfigurationError, match="empty range"):
        parse("3-1")
