"""on_eom annotated `-> None` / returning None: the answer to the MTA would be lost."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class EomNone(MilterSession):
    @override
    def on_eom(self) -> None:  # E: override
        return None


class EomBareReturn(MilterSession):
    @override
    def on_eom(self) -> Status:
        return  # E: return-value
