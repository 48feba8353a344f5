"""Whole-message filters, sync and async, mixed with other stages across mixins."""

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, Message, MilterSession, Status


class Counting(MilterSession):
    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE


class Tagger(Counting):
    actions = Actions.CHANGE_HEADER | Actions.ADD_HEADER
    max_message_size = 25 * 1024 * 1024
    too_big = Status.REJECT

    @override
    def on_message(self, message: Message) -> Status:
        mail = message.email
        del mail["X-Spam-Flag"]
        mail["X-Scanned"] = f"{len(message.recipients)} {message.size} {message.queue_id}"
        with message.open() as raw:
            raw.read(10)
        return Status.CONTINUE


class AsyncTagger(MilterSession):
    @override
    async def on_message(self, message: Message) -> Status:
        return Status.REJECT if not message.headers else Status.CONTINUE
