"""on_rcpt without the `params` argument: libmilter's callback would pass two arguments."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class RcptOneArg(MilterSession):
    @override
    def on_rcpt(self, recipient: str) -> Status:  # E: override
        return Status.CONTINUE
