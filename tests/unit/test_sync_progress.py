"""The sync on_eom progress thread guards a session's backend only while it is in on_eom."""

from __future__ import annotations

import threading
import types
from typing import Any

from pymilterkit._trampolines import SyncEomProgress, _Guarded


class Backend:
    def __init__(self) -> None:
        self.progressed = threading.Event()

    def progress(self) -> None:
        self.progressed.set()


def _wait(condition: Any) -> bool:
    done = threading.Event()
    for _ in range(400):  # at most ~4 s
        if condition():
            return True
        done.wait(0.01)
    return False


def test_the_plain_backend_comes_back_after_on_eom() -> None:
    plain = Backend()
    session = types.SimpleNamespace(_pmk_stage="on_eom", _pmk_pending=None, _pmk_backend=plain)
    callbacks: Any = types.SimpleNamespace(sessions={1: session})
    progress = SyncEomProgress(callbacks, 0.04)
    try:
        assert _wait(lambda: isinstance(session._pmk_backend, _Guarded))
        assert plain.progressed.wait(4)  # a long on_eom gets progress through the guard
        session._pmk_stage = None  # the stage ended: later actions need no lock
        assert _wait(lambda: session._pmk_backend is plain)
        session._pmk_stage = "on_eom"  # the next message's on_eom is guarded again
        assert _wait(lambda: isinstance(session._pmk_backend, _Guarded))
    finally:
        progress.stop()
