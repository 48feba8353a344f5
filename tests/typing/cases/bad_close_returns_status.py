"""on_close / on_abort answering with a Status: their result is not sent anywhere."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class CloseStatus(MilterSession):
    @override
    def on_close(self) -> Status:  # E: override
        return Status.CONTINUE


class AbortStatus(MilterSession):
    @override
    def on_abort(self) -> Status:  # E: override
        return Status.CONTINUE
