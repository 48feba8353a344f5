"""Which connections have a thread inside a stage callback: read from the threads' frames.

At a stop, `LibmilterCallbacks.close_all` must not close a session whose callback has looked
the session up but not yet marked its stage (`SessionRules.stage_callback`: `get(key)`, then
`session._pmk_stage = stage`): the stage would run after, or during, on_close. Marking the
session earlier would cost every command an instruction; instead the stop, which is rare,
looks at every thread's stack (`sys._current_frames`) for a frame of the callbacks' code and
reads its `key` local (the connection's SMFICTX). Nothing is added to the callbacks.

The code objects are the inner `callback` functions of `SessionRules.stage_callback` and
`SessionRules._async_callback` (every callback built there shares its function's code object,
whatever wrapper metrics or dry-run add around it). A frame is recognised by its globals
(`_dispatch`'s), its code's first line and its name, so the metered callback, which `_metered`
compiles again from the same source with its line numbers and runs with those globals, is
recognised too.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

from . import _dispatch
from ._dispatch import SessionRules

__all__ = ["CALLBACK_CODES", "keys_in_callbacks"]


def _inner(function: Callable[..., Any], name: str) -> types.CodeType:
    for const in function.__code__.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == name:
            return const
    raise RuntimeError(f"{function.__qualname__} defines no {name}()")  # a refactoring missed


CALLBACK_CODES = frozenset(
    _inner(function, "callback")
    for function in (SessionRules.stage_callback, SessionRules._async_callback)
)
"""The code of every stage callback: a frame of one holds its connection in `key`."""


_PLACES = frozenset((code.co_firstlineno, code.co_name) for code in CALLBACK_CODES)
_GLOBALS = vars(_dispatch)


def keys_in_callbacks() -> set[Any]:
    """The `key` of every stage callback some thread is inside now (any depth of its stack).

    A callback that starts after this returned is not in it: the caller takes sessions out of
    reach first (such a callback then finds none), then calls this.
    """
    keys = set()
    for frame in sys._current_frames().values():
        current: types.FrameType | None = frame
        while current is not None:
            code = current.f_code
            if current.f_globals is _GLOBALS and (code.co_firstlineno, code.co_name) in _PLACES:
                key = current.f_locals.get("key")
                if key is not None:
                    keys.add(key)
            current = current.f_back
    return keys
