"""Slow lookups done right: an `async def` recipient check against a policy service.

Every recipient is looked up in a policy service over TCP (a line protocol: the filter sends
`RCPT <address>`, the service answers `OK` or `REJECT <reason>`). The lookups are `async def`,
so while one waits, libmilter's threads and the event loop serve every other connection; one
connection per process is opened in `on_worker_start` and shared (requests are serialised on
it with a lock: a real client such as httpx.AsyncClient pools connections instead). Each
lookup is bounded by `timeout` seconds: a service that does not answer costs a TEMPFAIL for
that recipient (`--stage-timeout` bounds the whole stage as well).

At end of message it adds `X-Policy-Checked: <n>` (the recipients accepted).

Settings (`LookupConfig`, the `[filter]` table of a config file, `examples/lookup.toml`):
`host`, `port` of the service, `timeout` per lookup.

Run a service and the filter:
    python -m examples.lookup serve 127.0.0.1 8025
    pymilterkit run --config examples/lookup.toml
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, MilterSession, Status


@dataclass(frozen=True)
class LookupConfig:
    """The settings of `PolicyLookup` (the `[filter]` table of a config file)."""

    host: str = "127.0.0.1"
    port: int = 8025
    timeout: float = 5.0
    """Seconds a lookup may take before the recipient is answered TEMPFAIL."""


class PolicyClient:
    """One connection to the policy service, shared by the sessions of a process."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.lock = asyncio.Lock()
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def check(self, recipient: str) -> tuple[bool, str]:
        """(accepted, reason) for `recipient`."""
        async with self.lock:
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.streams
            try:
                writer.write(f"RCPT {recipient}\n".encode())
                await writer.drain()
                line = (await reader.readline()).decode().strip()
            except BaseException:
                self.streams = None  # a broken or cancelled exchange: reconnect next time
                writer.close()
                raise
        if not line:
            self.streams = None
            raise ConnectionError("the policy service closed the connection")
        verdict, _, reason = line.partition(" ")
        return verdict == "OK", reason

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class PolicyLookup(MilterSession):
    """Rejects recipients the policy service refuses; counts the accepted ones."""

    actions = Actions.ADD_HEADER
    config: ClassVar[LookupConfig] = LookupConfig()
    client: ClassVar[PolicyClient | None] = None

    def __init__(self) -> None:
        self.accepted = 0

    @classmethod
    @override
    async def on_worker_start(cls) -> None:
        cls.client = PolicyClient(cls.config.host, cls.config.port)

    @classmethod
    @override
    async def on_worker_stop(cls) -> None:
        if cls.client is not None:
            await cls.client.close()

    @override
    async def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.accepted = 0  # a new message on the same connection
        return Status.CONTINUE

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        assert self.client is not None
        address = recipient.strip("<>")
        try:
            ok, reason = await asyncio.wait_for(
                self.client.check(address), self.config.timeout
            )
        except (OSError, TimeoutError) as exc:
            self.log.warning("policy lookup for %s failed: %r", address, exc)
            self.set_reply("451", "4.3.0", "policy service unavailable, try again later")
            return Status.TEMPFAIL
        if not ok:
            self.set_reply("550", "5.7.1", reason or "rejected by policy")
            return Status.REJECT
        self.accepted += 1
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:  # sync: nothing to wait for here
        self.add_header("X-Policy-Checked", str(self.accepted))
        return Status.CONTINUE


# -- a policy service for trying it out (and for the tests) -----------------------------------


async def serve_policy(
    host: str, port: int, delay: float = 0.0, ready: asyncio.Event | None = None
) -> None:
    """A policy service: refuses local parts starting with `bad`, after `delay` seconds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                address = line.decode().removeprefix("RCPT ").strip()
                await asyncio.sleep(delay)
                if address.startswith("bad"):
                    writer.write(b"REJECT no such mailbox\n")
                else:
                    writer.write(b"OK\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        if ready is not None:
            ready.set()
        await server.serve_forever()


@contextlib.contextmanager
def policy_service(delay: float = 0.0) -> Iterator[int]:
    """`serve_policy` on 127.0.0.1 in a thread, for tests: yields its port; stopped on exit."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    loop = asyncio.new_event_loop()
    ready = asyncio.Event()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    # Made on the loop's thread: from Python 3.14 `asyncio.all_tasks()` on that thread does not
    # list a task another thread created, and `_cancel_others` would leave it running.
    task = asyncio.run_coroutine_threadsafe(serve_policy("127.0.0.1", port, delay, ready), loop)
    try:
        asyncio.run_coroutine_threadsafe(ready.wait(), loop).result(5)
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        assert task.done()


async def _cancel_others() -> None:
    """Cancel the service and its connections' handlers, and let their sockets close."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(3):
        await asyncio.sleep(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
        port = int(sys.argv[3]) if len(sys.argv) > 3 else 8025
        asyncio.run(serve_policy(host, port))
    else:
        from pymilterkit import Milter

        Milter(PolicyLookup, sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost").run()
