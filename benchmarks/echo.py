"""A loopback UDP echo server: the "lookup" the async benchmark milters await.

Each datagram is sent straight back to its sender, so a lookup costs the milter one real
socket round trip through its event loop (a send, a readiness wake-up, a receive) and nothing
else. Runs as its own process, so its CPU is not charged to the milter::

    python3 benchmarks/echo.py          # prints the port it bound on 127.0.0.1, then serves

SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
import sys


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    print(transport.get_extra_info("sockname")[1], flush=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop
    transport.close()


if __name__ == "__main__":
    asyncio.run(_serve())
    sys.exit(0)
