"""on_header with the arguments in one tuple, and on_eoh taking an argument it never gets."""

from typing_extensions import override

from pymilterkit import MilterSession, Status


class HeaderTuple(MilterSession):
    @override
    def on_header(self, header: tuple[str, str]) -> Status:  # E: override
        return Status.CONTINUE


class EohWithArg(MilterSession):
    @override
    def on_eoh(self, headers: list[str]) -> Status:  # E: override
        return Status.CONTINUE
