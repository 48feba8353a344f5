"""Whole-message filters with typical mistakes."""

from typing_extensions import override

from pymilterkit import Message, MilterSession, Status


class NoReturn(MilterSession):
    @override
    def on_message(self, message: Message) -> Status:  # E: return
        message.email["X"] = "y"


class WrongParameter(MilterSession):
    @override
    def on_message(self, message: bytes) -> Status:  # E: override
        return Status.CONTINUE


class WrongAttributes(MilterSession):
    max_message_size = "25M"  # E: assignment
    too_big = True  # E: assignment

    @override
    def on_message(self, message: Message) -> Status:
        return Status.CONTINUE
