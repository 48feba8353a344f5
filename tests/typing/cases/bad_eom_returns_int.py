"""on_eom answering with libmilter's raw number instead of the Status member."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class EomInt(MilterSession):
    @override
    def on_eom(self) -> Status:
        return 0  # E: return-value
