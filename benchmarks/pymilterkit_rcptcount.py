"""The benchmark's "recipient counter" milter written with pymilterkit.

Same filter as ``c/rcptcount.c`` and ``pymilter_rcptcount.py``: on_mail resets the count,
on_rcpt increments it, on_eom adds ``X-Rcpt-Count: <n>``; only ``Actions.ADD_HEADER``.

* answered variant (default): ``examples/rcpt_count.py``'s ``RcptCount`` as it is, so MAIL and
  every RCPT are answered (like ``rcptcount`` without ``-n`` and pymilter ``--reply``);
* ``--noreply``: the same class with ``@noreply`` on on_mail/on_rcpt (SMFIP_NR_MAIL|NR_RCPT),
  like ``rcptcount -n`` and the default pymilter variant;
* ``--async``: the same filter with ``async def on_rcpt`` (``RcptCountAsync``; with
  ``--noreply``, ``RcptCountAsyncNoReply``): what handing each RCPT to the event loop costs.

Runs with the project's interpreter (pymilterkit importable from the checkout)::

    python3 benchmarks/pymilterkit_rcptcount.py [--noreply] [--async] [--workers N] \
        unix:/tmp/x/m.sock

SIGTERM stops it (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from typing_extensions import override  # noqa: E402

from examples.rcpt_count import RcptCount  # noqa: E402
from pymilterkit import EsmtpParams, Milter, Status, noreply  # noqa: E402
from pymilterkit._affinity import parse as parse_affinity  # noqa: E402


class RcptCountNoReply(RcptCount):
    """RcptCount whose MAIL and RCPT are not answered (the MTA does not wait for them)."""

    @noreply
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.count = 0
        return Status.CONTINUE

    @noreply
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.count += 1
        return Status.CONTINUE


class RcptCountAsync(RcptCount):
    """RcptCount with `async def on_rcpt` (it never suspends): the async hand-off's cost."""

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.count += 1
        return Status.CONTINUE


class RcptCountAsyncNoReply(RcptCountAsync):
    """RcptCountNoReply with `async def on_rcpt`: MAIL and RCPT not answered."""

    @override
    @noreply
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.count = 0
        return Status.CONTINUE

    @override
    @noreply
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.count += 1
        return Status.CONTINUE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sockspec", help="socket spec, e.g. unix:/tmp/x/m.sock or inet:3000@127.0.0.1")
    ap.add_argument("--noreply", action="store_true", help="@noreply on on_mail/on_rcpt")
    ap.add_argument("--async", dest="asynchronous", action="store_true",
                    help="async def on_rcpt (RcptCountAsync)")
    ap.add_argument("--workers", type=int, default=1, help="pre-forked worker processes")
    ap.add_argument("--timeout", type=int, default=600, help="MTA read/write timeout (s)")
    ap.add_argument("--cpu-affinity", default="auto", help="auto (default), none, or CPUs")
    ap.add_argument("--socket-mode", type=lambda v: int(v, 8), default=None,
                    help="octal mode of a unix socket (e.g. 666 so Postfix can connect)")
    ap.add_argument("--metrics", default=None, metavar="HOST:PORT",
                    help="serve /metrics and /healthz there (benchmarks/metrics.py)")
    args = ap.parse_args(argv)
    if args.metrics:  # the start-up lines say which port --metrics 127.0.0.1:0 took
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cls: type[RcptCount] = {
        (False, False): RcptCount, (True, False): RcptCountNoReply,
        (False, True): RcptCountAsync, (True, True): RcptCountAsyncNoReply,
    }[(args.noreply, args.asynchronous)]
    Milter(cls, args.sockspec, name="bench", timeout=args.timeout, workers=args.workers,
           socket_mode=args.socket_mode, cpu_affinity=parse_affinity(args.cpu_affinity),
           metrics=args.metrics).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
