"""on_body taking str: body chunks are bytes."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class BodyStr(MilterSession):
    @override
    def on_body(self, chunk: str) -> Status:  # E: override
        return Status.CONTINUE
