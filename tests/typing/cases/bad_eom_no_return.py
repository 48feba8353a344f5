"""on_eom that forgets to return a Status (falls off the end: None)."""

from typing_extensions import override

from pymilterkit import Actions, MilterSession, Status


class EomNoReturn(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:  # E: return
        self.add_header("X-Seen", "yes")
