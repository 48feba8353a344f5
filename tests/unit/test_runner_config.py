"""Milter(...) refuses unusable settings before anything starts (no libmilter needed)."""

from __future__ import annotations

from typing import Any

import pytest

from pymilterkit import ConfigurationError, Milter, MilterSession, SocketSpecError, Status


class Fine(MilterSession):
    pass


class NeedsArgs(MilterSession):
    def __init__(self, x: int) -> None:
        self.x = x


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((Fine(), "unix:/tmp/x"), {}, ConfigurationError),
        ((int, "unix:/tmp/x"), {}, ConfigurationError),
        ((NeedsArgs, "unix:/tmp/x"), {}, ConfigurationError),
        ((Fine, "bogus:1"), {}, SocketSpecError),
        ((Fine, "unix:/tmp/x"), {"timeout": 0}, ConfigurationError),
        ((Fine, "unix:/tmp/x"), {"backlog": -1}, ConfigurationError),
        ((Fine, "unix:/tmp/x"), {"debug_level": -1}, ConfigurationError),
        ((Fine, "unix:/tmp/x"), {"error_status": Status.SKIP}, ConfigurationError),
        ((Fine, "unix:/tmp/x"), {"workers": 0}, ConfigurationError),
        ((Fine, "unix:/tmp/x"), {"socket_mode": 0o1777}, ConfigurationError),
        ((Fine, "inet:25@127.0.0.1"), {"socket_mode": 0o660}, ConfigurationError),
    ],
)
def test_bad_settings(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Milter(*args, **kwargs)


def test_good_settings_are_kept() -> None:
    m = Milter(Fine, "inet6:3000@[::1]", name="n", timeout=5, backlog=3, workers=2)
    assert (m.name, m.timeout, m.backlog, m.workers) == ("n", 5, 3, 2)
    assert m.spec.libmilter() == "inet6:3000@[::1]"
