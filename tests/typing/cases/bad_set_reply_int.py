"""set_reply with an int reply code (it is text: "550")."""

from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status


class ReplyInt(MilterSession):
    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.set_reply(550, "5.7.1", "no such user")  # E: arg-type
        return Status.REJECT
