"""`async def` stage methods and hooks, mixed with sync ones, also across mixins."""

from __future__ import annotations

import asyncio

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, InetAddress, MilterSession, Status, UnixAddress
from pymilterkit import noreply


class Lookups(MilterSession):
    """Async recipient checks with a shared resource made once per process."""

    table: dict[str, bool] = {}

    @classmethod
    @override
    async def on_worker_start(cls) -> None:
        await asyncio.sleep(0)
        cls.table = {"bad@example.com": True}

    @classmethod
    @override
    async def on_worker_stop(cls) -> None:
        cls.table = {}

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        await asyncio.sleep(0)
        return Status.REJECT if self.table.get(recipient.strip("<>")) else Status.CONTINUE


class Headers(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.host = hostname
        return Status.CONTINUE

    @override
    @noreply
    async def on_header(self, name: str, value: str) -> Status:
        return Status.CONTINUE

    @override
    async def on_eom(self) -> Status:
        self.add_header("X-Host", self.host)
        return Status.CONTINUE

    @override
    async def on_abort(self) -> None:
        await asyncio.sleep(0)

    @override
    def on_close(self) -> None:
        pass


class Both(Lookups, Headers):
    """A sync on_connect, async on_rcpt/on_header/on_eom from two mixins."""
