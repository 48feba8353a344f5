"""The benchmark's "recipient counter" milter written with pymilterkit.

Same filter as ``c/rcptcount.c`` and ``pymilter_rcptcount.py``: on_mail resets the count,
on_rcpt increments it, on_eom adds ``X-Rcpt-Count: <n>``; only ``Actions.ADD_HEADER``.

* answered variant (default): ``examples/rcpt_count.py``'s ``RcptCount`` as it is, so MAIL and
  every RCPT are answered (like ``rcptcount`` without ``-n`` and pymilter ``--reply``);
* ``--noreply``: the same class with ``@noreply`` on on_mail/on_rcpt (SMFIP_NR_MAIL|NR_RCPT),
  like ``rcptcount -n`` and the default pymilter variant;
* ``--async``: the same filter with ``async def on_rcpt`` (``RcptCountAsync``; with
  ``--noreply``, ``RcptCountAsyncNoReply``): a coroutine that never suspends;
* ``--async suspend``: ``on_rcpt`` awaits once (``asyncio.sleep(0)``, ``RcptCountSuspend``):
  what one suspension and wake-up on the event loop costs;
* ``--async lookup --lookup PORT``: ``on_rcpt`` sends the recipient to a UDP echo server on
  127.0.0.1:PORT (``benchmarks/echo.py``) and awaits the reply (``RcptCountLookup``): the loop
  does real I/O, as a filter's lookups do.

Runs with the project's interpreter (pymilterkit importable from the checkout)::

    python3 benchmarks/pymilterkit_rcptcount.py [--noreply] [--async [suspend|lookup]] \
        [--lookup PORT] [--workers N] \
        unix:/tmp/x/m.sock

SIGTERM stops it (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from typing_extensions import override  # noqa: E402

from examples.rcpt_count import RcptCount  # noqa: E402
from pymilterkit import EsmtpParams, Milter, MilterSession, Status, noreply  # noqa: E402
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


class RcptCountSuspend(RcptCount):
    """RcptCount whose `async def on_rcpt` suspends once: the cost of a real await."""

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        await asyncio.sleep(0)
        self.count += 1
        return Status.CONTINUE


class _EchoClient(asyncio.DatagramProtocol):
    """One UDP socket per process; replies matched to their request by a sequence number."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.numbers = itertools.count()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        future = self.waiting.pop(data.split(b" ", 1)[0], None)
        if future is not None and not future.done():
            future.set_result(data)

    async def ask(self, question: bytes) -> bytes:
        key = b"%d" % next(self.numbers)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        self.transport.sendto(key + b" " + question)
        return await future


class RcptCountLookup(RcptCount):
    """RcptCount whose `async def on_rcpt` awaits a loopback UDP echo of the recipient."""

    lookup_port = 0
    client: _EchoClient | None = None

    @classmethod
    async def on_worker_start(cls) -> None:
        loop = asyncio.get_running_loop()
        _, cls.client = await loop.create_datagram_endpoint(
            _EchoClient, remote_addr=("127.0.0.1", cls.lookup_port)
        )

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        assert self.client is not None
        answer = await self.client.ask(recipient.encode())
        if not answer.endswith(recipient.encode()):
            return Status.TEMPFAIL
        self.count += 1
        return Status.CONTINUE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sockspec", help="socket spec, e.g. unix:/tmp/x/m.sock or inet:3000@127.0.0.1")
    ap.add_argument("--noreply", action="store_true", help="@noreply on on_mail/on_rcpt")
    ap.add_argument("--async", dest="asynchronous", nargs="?", const="never", default=None,
                    choices=["never", "suspend", "lookup"],
                    help="async def on_rcpt that never suspends (the default), awaits once "
                    "(suspend) or awaits a UDP echo on --lookup PORT (lookup)")
    ap.add_argument("--lookup", type=int, default=0, metavar="PORT",
                    help="the UDP echo server's port on 127.0.0.1 (benchmarks/echo.py)")
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
    cls: type[MilterSession] = {
        (False, None): RcptCount, (True, None): RcptCountNoReply,
        (False, "never"): RcptCountAsync, (True, "never"): RcptCountAsyncNoReply,
        (False, "suspend"): RcptCountSuspend, (False, "lookup"): RcptCountLookup,
    }[(args.noreply, args.asynchronous)]
    RcptCountLookup.lookup_port = args.lookup
    Milter(cls, args.sockspec, name="bench", timeout=args.timeout, workers=args.workers,
           socket_mode=args.socket_mode, cpu_affinity=parse_affinity(args.cpu_affinity),
           metrics=args.metrics).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
