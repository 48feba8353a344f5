"""A misspelt stage method under @override: without it, on_rcp would silently never run."""

from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status


class Misspelt(MilterSession):
    @override
    def on_rcp(self, recipient: str, params: EsmtpParams) -> Status:  # E: misc
        return Status.CONTINUE
