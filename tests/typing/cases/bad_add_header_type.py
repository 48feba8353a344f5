"""add_header with an int header name."""

from typing_extensions import override

from pymilterkit import Actions, MilterSession, Status


class AddHeaderInt(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:
        self.add_header(1, "x")  # E: arg-type
        return Status.CONTINUE
