"""The binding's floor: pymilterkit's runner with stage callbacks that run no filter code.

A diagnostic row of the suite, not a filter. The runner, the pre-forked workers, the CPU
placement, the ctypes callbacks and the thread-state pins are pymilterkit's own; only the
trampolines are replaced (a private hook, `LibmilterCallbacks._stage`) by ones that answer at once:
MAIL and RCPT return their answer without creating a session or calling Python code; EOM
calls smfi_addheader with the constant `X-Rcpt-Count: 3` (the generator sends 3 recipients,
`run.py` fixes that) through the same ctypes function pymilterkit uses. So

    pymilterkit-w2 / pymilterkit-empty-w2

is what pymilterkit's Python work (session lookup, argument conversion, checks, the filter's
own methods, header validation) costs on top of merely crossing from libmilter's C threads
into the interpreter and back, five times a message.

    python3 benchmarks/pymilterkit_empty.py [--noreply] [--workers N] unix:/tmp/x/m.sock
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pymilterkit_rcptcount  # noqa: E402

from pymilterkit import Status, _trampolines  # noqa: E402
from pymilterkit import _threadstate as threadstate  # noqa: E402

HEADER, VALUE = b"X-Rcpt-Count", b"3"


def _empty_stage(self: _trampolines.LibmilterCallbacks, stage: str,
                 convert: Callable[..., Any] | None) -> Callable[..., int]:
    pin, pins = threadstate.pin_thread_state, threadstate.pins
    if stage == "on_eom":
        addheader = self.lib.smfi_addheader

        def eom(ctx: int) -> int:
            if not pins.__dict__:
                pin()
            addheader(ctx, HEADER, VALUE)
            return 0

        return eom
    answer = int(Status.NOREPLY if stage in self.noreply else Status.CONTINUE)

    def envelope(ctx: int, argv: Any) -> int:
        if not pins.__dict__:
            pin()
        return answer

    return envelope


_trampolines.LibmilterCallbacks._stage = _empty_stage  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(pymilterkit_rcptcount.main())
