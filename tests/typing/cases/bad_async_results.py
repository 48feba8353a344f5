"""Mistakes in `async def` stage methods are still caught."""

from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status


class WrongResult(MilterSession):
    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> int:  # E: override
        return 0


class WrongValue(MilterSession):
    @override
    async def on_eom(self) -> Status:
        return "continue"  # E: return-value


class WrongParameters(MilterSession):
    @override
    async def on_rcpt(self, recipient: bytes, params: EsmtpParams) -> Status:  # E: override
        return Status.CONTINUE


class CloseReturnsStatus(MilterSession):
    @override
    async def on_close(self) -> Status:  # E: override
        return Status.CONTINUE


class HookNotClassmethod(MilterSession):
    @override
    async def on_worker_start(self) -> None:  # E: override
        pass
