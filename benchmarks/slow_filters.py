"""The filters of `slow_lookups.py`: a per-recipient lookup against a local HTTP server.

Each recipient is looked up (``GET /rcpt/<local part>`` on ``PMK_LOOKUP``, ``HOST:PORT``); the
server answers ``accept`` or ``reject`` (after its delay). ``fast-...`` recipients are accepted
without a lookup (the "good" messages of the benchmark). An accepted recipient is counted, a
rejected one gets ``550 5.1.1``; end of message adds ``X-Accepted: <count>``.

* `SlowAsync`: ``async def on_rcpt``, the lookup with ``asyncio.open_connection`` through a
  client (`AsyncLookup`) made in ``on_worker_start``, on the milter's event loop;
* `SlowSync`: the same filter written sync, with a blocking ``socket`` lookup.

    PMK_LOOKUP=127.0.0.1:8080 pymilterkit run benchmarks/slow_filters.py:SlowAsync \\
        --socket unix:/tmp/x/m.sock
"""

from __future__ import annotations

import asyncio
import os
import socket

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, MilterSession, Status

TIMEOUT = 10.0
"""Seconds a lookup may take before it fails (then the error policy answers)."""


def _address() -> tuple[str, int]:
    host, _, port = os.environ.get("PMK_LOOKUP", "127.0.0.1:8080").rpartition(":")
    return host, int(port)


def _request(local: str) -> bytes:
    return f"GET /rcpt/{local} HTTP/1.0\r\nHost: lookup\r\n\r\n".encode()


def _verdict(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise LookupError(f"lookup failed: {head[:80]!r}")
    return body.strip().decode()


class AsyncLookup:
    """The shared lookup client of `SlowAsync` (one per serving process, on its loop)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def get(self, local: str) -> str:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(_request(local))
                return _verdict(await reader.read())  # HTTP/1.0: the answer ends at EOF
            finally:
                writer.close()
                await writer.wait_closed()


def sync_lookup(local: str) -> str:
    """The same lookup with a blocking socket (`SlowSync`)."""
    with socket.create_connection(_address(), timeout=TIMEOUT) as s:
        s.sendall(_request(local))
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return _verdict(b"".join(chunks))


class _Counted(MilterSession):
    actions = Actions.ADD_HEADER

    def __init__(self) -> None:
        self.accepted = 0

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.accepted = 0
        return Status.CONTINUE

    def _answer(self, verdict: str) -> Status:
        if verdict == "accept":
            self.accepted += 1
            return Status.CONTINUE
        if verdict == "reject":
            self.set_reply("550", "5.1.1", "rejected by the lookup")
            return Status.REJECT
        raise LookupError(f"unknown verdict {verdict!r}")

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Accepted", str(self.accepted))
        return Status.CONTINUE


def _local(recipient: str) -> str:
    return recipient.strip("<>").split("@")[0]


class SlowAsync(_Counted):
    """Each recipient awaits the lookup (`fast-...` ones do not)."""

    client: AsyncLookup | None = None

    @classmethod
    @override
    async def on_worker_start(cls) -> None:
        cls.client = AsyncLookup(*_address())

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = _local(recipient)
        if local.startswith("fast-"):
            return self._answer("accept")
        assert self.client is not None
        return self._answer(await self.client.get(local))


class SlowSync(_Counted):
    """The same filter written sync: the lookup blocks libmilter's worker thread."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = _local(recipient)
        if local.startswith("fast-"):
            return self._answer("accept")
        return self._answer(sync_lookup(local))
