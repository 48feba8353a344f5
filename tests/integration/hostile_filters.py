"""Filters for tests/integration/test_hostile_macros.py (each runs in its own process)."""

from __future__ import annotations

import asyncio

from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    MilterSession,
    Status,
    UnixAddress,
)


class Custom(BaseException):
    """A BaseException that is neither an Exception nor KeyboardInterrupt/SystemExit."""


class BaseRaiser(MilterSession):
    """on_rcpt raises a non-fatal BaseException chosen by the recipient's local part."""

    actions = Actions.ADD_HEADER

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        local = recipient.strip("<>").split("@")[0]
        if local == "cancelled":
            raise asyncio.CancelledError("stray cancellation")
        if local == "genexit":
            raise GeneratorExit("stray generator exit")
        if local == "custom":
            raise Custom("custom base exception")
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Served", "yes")
        return Status.CONTINUE


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
