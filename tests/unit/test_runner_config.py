"""Milter(...) refuses unusable settings before anything starts (no libmilter needed)."""

from __future__ import annotations

from typing import Any

import pytest

from pymilterkit import ConfigurationError, Milter, MilterSession, SocketSpecError, Status
from pymilterkit._listen import open_listener


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
    o = m.options
    assert (m.name, o.timeout, o.backlog, o.workers) == ("n", 5, 3, 2)
    assert m.spec.libmilter() == "inet6:3000@[::1]"


class RecordingLib:
    """libmilter's setters, recorded; every call succeeds (MI_SUCCESS)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> int:
            self.calls.append((name, args))
            return 0

        return call


@pytest.mark.parametrize(("timeout", "expected"), [(None, 600), (5, 5)])
def test_libmilter_gets_a_600_s_io_timeout_unless_told(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, timeout: int | None, expected: int
) -> None:
    """Not libmilter's 7,210 s: a peer holding half a packet would hold a worker for 2 hours
    (issue 19.4)."""
    from pymilterkit import _libmilter

    lib = RecordingLib()
    monkeypatch.setattr(_libmilter, "load", lambda: lib)
    milter = Milter(Fine, f"unix:{tmp_path}/m.sock", timeout=timeout)
    listener = open_listener(milter.spec)
    server = milter.filter().server(None, None)
    server.prepare(listener.fileno(), inherited=False, own_socket=listener.close)
    try:
        assert ("smfi_settimeout", (expected,)) in lib.calls
    finally:
        server._discard()
        server._stop_worker()
        listener.close()
