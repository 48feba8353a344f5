"""on_rcpt with the parameters typed as bytes / a plain dict instead of str / EsmtpParams."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class RcptBytes(MilterSession):
    @override
    def on_rcpt(self, recipient: bytes, params: dict[str, str]) -> Status:  # E: override
        return Status.CONTINUE
