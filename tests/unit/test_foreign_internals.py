"""What pymilterkit relies on in foreign code, checked on this interpreter and C library.

Each room that depends on something its owner never promised has a test here that fails when
that something changes: libmilter's private layout (`_libmilter_private`: its fallback is
logged once), asyncio's loop internals (`_loop`) and CPython's thread-state API
(`_threadstate`). And `import pymilterkit` has no side effects beyond defining names.
"""

from __future__ import annotations

import logging

import pytest

from pymilterkit import _libmilter_private

# -- libmilter's private layout -----------------------------------------------------------------


def test_an_unknown_layout_is_logged_once_with_what_falls_back_and_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_libmilter_private._Layout, "known", None)
    monkeypatch.setattr(_libmilter_private, "version", lambda: (1, 0, 2))
    with caplog.at_level(logging.WARNING, logger="pymilterkit"):
        for _ in range(3):
            assert not _libmilter_private.layout_known(0)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    message = caplog.records[0].getMessage()
    assert "libmilter_version() 1.0.2" in message
    assert "layout check: smfi_version() is 1.0.2, not 1.0.1" in message
    assert "late answers" in message and "bounded macro reads" in message

