"""on_eom answering with a string instead of a Status."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class EomStr(MilterSession):
    @override
    def on_eom(self) -> Status:
        return "continue"  # E: return-value
