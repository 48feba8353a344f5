"""The per-callback cost of pymilterkit's trampolines, called from C as libmilter calls them.

No socket and no MTA: a C loop (`c/callloop.c`, built as `build/libcallloop.so`) calls the
exact callbacks pymilterkit registers with libmilter (`LibmilterCallbacks.descriptor`) for the
recipient counter, with libmilter's argument shapes; `smfi_addheader` is a C stub with the same
signature, called through the same ctypes declaration path. Single thread, warm caches: this is
the lower bound of the Python work per message, without the thread hops and cache misses of a
real milter (see docs/performance.md). The reference, in the same invocation, is an empty
ctypes callback of the same C type, so the figures are also given as ratios to it.

    python3 benchmarks/callbacks.py [--calls N]
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIB = HERE / "build" / "libcallloop.so"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from pymilterkit_rcptcount import RcptCount  # noqa: E402

from pymilterkit import Status  # noqa: E402
from pymilterkit import _libmilter as c  # noqa: E402
from pymilterkit._trampolines import LibmilterCallbacks  # noqa: E402

CTX = 0x1234  # any non-NULL value: the stub never dereferences it


def _build() -> None:
    if LIB.exists() and LIB.stat().st_mtime >= (HERE / "c" / "callloop.c").stat().st_mtime:
        return
    if shutil.which("make"):
        subprocess.run(["make", "-s", "-C", str(HERE), "build/libcallloop.so"], check=True)
    else:
        LIB.parent.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(LIB),
                        str(HERE / "c" / "callloop.c")], check=True)


class _StubLibmilter:
    """Only what the recipient counter's eom reaches: smfi_addheader, a C function."""

    def __init__(self, loop: ctypes.CDLL) -> None:
        self.smfi_addheader = loop.stub_addheader
        self.smfi_addheader.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        self.smfi_addheader.restype = ctypes.c_int


def _best(run: Callable[[int], object], calls: int, repeat: int = 5) -> float:
    """Best of `repeat` loops, in µs per call."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(calls)
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def measure(calls: int = 300_000) -> dict[str, Any]:
    """µs per callback (MAIL with parameters, RCPT, EOM with add_header) and per message."""
    _build()
    loop = ctypes.CDLL(str(LIB))
    loop.loop_argv.argtypes = [c.ARGV, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    loop.loop_ctx.argtypes = [c.CTXONLY, ctypes.c_void_p, ctypes.c_long]
    dispatcher = LibmilterCallbacks(RcptCount, _StubLibmilter(loop), Status.TEMPFAIL,  # type: ignore[arg-type]
                            lambda exc: None)
    desc = dispatcher.descriptor(b"callbacks")
    dispatcher._create(CTX)
    empty_argv, empty_ctx = c.ARGV(lambda ctx, argv: 0), c.CTXONLY(lambda ctx: 0)
    stub = loop.stub_addheader
    stub.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]

    def header(n: int) -> None:
        for _ in range(n):
            stub(CTX, b"X-Rcpt-Count", b"3")

    out = {
        "mail_params_us": _best(lambda n: loop.loop_argv(desc.xxfi_envfrom, CTX, 1, n), calls),
        "rcpt_us": _best(lambda n: loop.loop_argv(desc.xxfi_envrcpt, CTX, 0, n), calls),
        "eom_us": _best(lambda n: loop.loop_ctx(desc.xxfi_eom, CTX, n), calls),
        "empty_argv_us": _best(lambda n: loop.loop_argv(empty_argv, CTX, 1, n), calls),
        "empty_ctx_us": _best(lambda n: loop.loop_ctx(empty_ctx, CTX, n), calls),
        "addheader_call_us": _best(header, calls),
    }
    out["message_us"] = out["mail_params_us"] + 3 * out["rcpt_us"] + out["eom_us"]
    out["empty_message_us"] = (4 * out["empty_argv_us"] + out["empty_ctx_us"]
                               + out["addheader_call_us"])
    out["calls"] = calls
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def report(r: dict[str, Any]) -> str:
    """The figures as a small table, each with its ratio to the empty-callback reference."""
    rows = [
        ("MAIL with SIZE=, BODY=", r["mail_params_us"], r["empty_argv_us"]),
        ("RCPT", r["rcpt_us"], r["empty_argv_us"]),
        ("EOM with add_header", r["eom_us"], r["empty_ctx_us"] + r["addheader_call_us"]),
        ("message (MAIL, 3 x RCPT, EOM)", r["message_us"], r["empty_message_us"]),
    ]
    lines = [f"{'callback (warm, one thread)':<32}{'µs':>8}{'empty µs':>10}{'x empty':>9}"]
    for name, us, ref in rows:
        lines.append(f"{name:<32}{us:8.3f}{ref:10.3f}{us / ref:9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--calls", type=int, default=300_000, help="calls per timed loop")
    args = ap.parse_args(argv)
    print(report(measure(args.calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
