"""An `async def` stage method: libmilter calls it synchronously and would get a coroutine."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class AsyncEom(MilterSession):
    @override
    async def on_eom(self) -> Status:  # E: override
        return Status.CONTINUE
