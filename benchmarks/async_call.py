"""User-space instructions of one async stage call in the runner, counted by callgrind.

    python3 benchmarks/async_call.py [--calls 2000]

`LibmilterCallbacks.answer_async` on a real `EventLoopThread` (no libmilter: the calling thread
waits for a suspended stage's answer) for the recipient counter's `on_rcpt` as
`RcptCountAsync` (never suspends) and `RcptCountSuspend` (`await asyncio.sleep(0)`), and the
coroutine alone (`send(None)` by hand: no task, no loop) for the floor. Each is run under
callgrind twice, with `--calls` and three times as many calls: the difference over the extra calls
is the cost of one, start-up taken off. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("coroutine", "never", "suspend")


def _child(kind: str, calls: int) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import pymilterkit_rcptcount as bench

    from pymilterkit import Status
    from pymilterkit._dispatch import NO_PARAMS
    from pymilterkit._loop import EventLoopThread
    from pymilterkit._trampolines import LibmilterCallbacks

    cls = bench.RcptCountSuspend if kind == "suspend" else bench.RcptCountAsync
    loop = EventLoopThread()
    callbacks = LibmilterCallbacks(cls, None, Status.TEMPFAIL, print, loop=loop)  # type: ignore[arg-type]
    callbacks._answer_later = False
    session = cls()
    session.count = 0
    answer = callbacks.answer_async

    def call() -> None:
        session._pmk_stage = "on_rcpt"
        coro = session.on_rcpt("a@example.org", NO_PARAMS)
        if kind == "coroutine":
            try:
                coro.send(None)
            except StopIteration:
                return
            raise AssertionError("it suspended")
        assert answer(0, session, "on_rcpt", coro) == Status.CONTINUE

    for _ in range(calls):
        call()
    loop.stop()


def _instructions(kind: str, calls: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             __file__, "--child", kind, "--calls", str(calls)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    found = re.search(r"Collected : ([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.calls)
        return 0
    print(f"instructions per call (callgrind; {args.calls} against {3 * args.calls} calls), "
          f"Python {sys.version.split()[0]}")
    per = {}
    for kind in KINDS:
        low, high = _instructions(kind, args.calls), _instructions(kind, 3 * args.calls)
        per[kind] = (high - low) / (2 * args.calls)
        print(f"  {kind:10s} {per[kind]:10,.0f}")
    runner, suspension = per["never"] - per["coroutine"], per["suspend"] - per["never"]
    print(f"  the runner's async call over the coroutine alone: {runner:,.0f}; "
          f"a sleep(0) suspension: {suspension:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
