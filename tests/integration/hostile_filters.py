"""A filter for tests/integration/test_hostile_macros.py (it runs in its own process); the
stray BaseExceptions of that test are `filters.Faulty`'s."""

from __future__ import annotations

import asyncio

from typing_extensions import override

from pymilterkit import (
    Actions,
    InetAddress,
    MilterSession,
    Status,
    UnixAddress,
)


class MacroProbe(MilterSession):
    """Looks up macros at connect, reports them and the unknown command at end of message.

    A hostile client sends an odd-length macro list before connect; smfi_getsymval walks past
    its end looking for an absent name.
    """

    actions = Actions.ADD_HEADER
    found: dict[str, str | None]
    unknown: list[str]

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.found = {name: self.macro(name) for name in ("{absent}", "j", "v", "k", "x")}
        self.unknown = []
        return Status.CONTINUE

    @override
    def on_unknown(self, command: str) -> Status:
        self.unknown.append(command)
        # REJECT tells the client what arrived: anything past the packet would show here.
        return Status.CONTINUE if command == "ABC" else Status.REJECT

    @override
    def on_eom(self) -> Status:
        for name, value in sorted(self.found.items()):
            self.add_header(f"X-Macro-{name.strip('{}')}", repr(value))
        self.add_header("X-Unknown", repr(self.unknown))
        return Status.CONTINUE


class AsyncMacroReader(MilterSession):
    """`async def on_connect` reading `j` between awaits: REJECT unless every read saw the value
    sent before the connect (issue 27.1: later macro packets freed what the reads used)."""

    async def on_connect(
        self, hostname: str, address: InetAddress | UnixAddress | None
    ) -> Status:
        seen = {self.macro("j")}
        for _ in range(6):
            await asyncio.sleep(0.0005)
            seen.add(self.macro("j"))
            seen.add(self.macro("{j}"))
        return Status.CONTINUE if seen == {"first"} else Status.REJECT
