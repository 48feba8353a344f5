"""Session actions called with wrong argument types."""

from typing_extensions import override

from pymilterkit import Actions, MilterSession, Status


class WrongActionArgs(MilterSession):
    actions = (
        Actions.ADD_HEADER
        | Actions.CHANGE_HEADER
        | Actions.CHANGE_BODY
        | Actions.ADD_RCPT
        | Actions.QUARANTINE
    )

    @override
    def on_eom(self) -> Status:
        self.insert_header("0", "X-First", "yes")  # E: arg-type
        self.change_header("Subject", "x", index="1")  # E: arg-type
        self.replace_body("new body\r\n")  # E: arg-type
        self.add_recipient(["a@example.org", "b@example.org"])  # E: arg-type
        self.quarantine(None)  # E: arg-type
        self.set_reply("550", "5.7.1", ["line one", "line two"])  # E: arg-type
        return Status.CONTINUE
