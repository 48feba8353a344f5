"""Using macro() as if it always returned a str: the MTA may not have sent the macro."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class MacroUnchecked(MilterSession):
    @override
    def on_eom(self) -> Status:
        queue_id: str = self.macro("i")  # E: assignment
        if self.macro("{auth_authen}").startswith("admin"):  # E: union-attr
            return Status.ACCEPT
        return Status.CONTINUE if queue_id else Status.TEMPFAIL
