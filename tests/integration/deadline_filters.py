"""Filters for tests/integration/test_deadlines.py (each runs in its own process)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, Message, MilterSession, Status, WrongStageError
from tests.helpers import local_part, requested_sleep


class SlowSync(MilterSession):
    """Sync on_rcpt and on_eom that sleep as a `sleep-S` recipient says."""

    slept = 0.0

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.slept = requested_sleep(local_part(recipient)) or 0.0
        time.sleep(self.slept)
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        time.sleep(self.slept)
        return Status.CONTINUE


class Stubborn(MilterSession):
    """Async stages that misbehave at their deadline, by recipient: `swallow` catches the
    cancellation and goes on, `block` blocks the event loop after its first await, `stop` stops
    the event loop, `close` closes it for good, `sleep-S` sleeps; on_eom sleeps as long as the
    last recipient said."""

    slept = 0.0

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        name = local_part(recipient)
        if name == "swallow":
            try:
                await asyncio.sleep(20)
            except asyncio.CancelledError:
                await asyncio.sleep(5)  # swallowed: goes on
            return Status.CONTINUE
        await asyncio.sleep(0.001)
        if name == "block":
            time.sleep(1.5)  # a blocking call on the event loop
        elif name == "stop":
            asyncio.get_running_loop().stop()
        elif name == "close":  # broken for good: stopped and closed from another thread
            threading.Thread(target=_close, args=(asyncio.get_running_loop(),)).start()
        self.slept = requested_sleep(name) or 0.0
        await asyncio.sleep(self.slept)
        return Status.CONTINUE

    @override
    async def on_eom(self) -> Status:
        await asyncio.sleep(self.slept)
        return Status.CONTINUE


class StubbornWhole(MilterSession):
    """An async on_message that, for a message with Subject `swallow`, catches the
    cancellation at its deadline and goes on for a second (so does on_rcpt for a recipient
    `swallow`); it logs what each message brought."""

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if local_part(recipient) == "swallow":
            try:
                await asyncio.sleep(20)
            except asyncio.CancelledError:
                await asyncio.sleep(1)  # swallowed: goes on past the deadline
        return Status.CONTINUE

    @override
    async def on_message(self, message: Message) -> Status:
        if dict(message.headers).get("Subject") == " swallow":
            try:
                await asyncio.sleep(20)
            except asyncio.CancelledError:
                await asyncio.sleep(1)  # swallowed: goes on past the deadline
            return Status.CONTINUE
        logging.getLogger("pymilterkit").warning(
            "on_message saw sender=%s recipients=%s headers=%s",
            message.sender, ",".join(message.recipients), len(message.headers))
        return Status.CONTINUE


class Lingering(MilterSession):
    """on_rcpt for a `swallow` recipient catches its cancellation and goes on: for a `late`
    one until on_eom began, then tries to act on its session while on_eom waits for that;
    else for 4 s. on_close says when it ran."""

    actions = Actions.ADD_HEADER
    eom_began: asyncio.Event | None = None  # (made on the loop, by the first stage)
    acted: asyncio.Event | None = None

    @classmethod
    def events(cls) -> tuple[asyncio.Event, asyncio.Event]:
        if cls.eom_began is None or cls.acted is None:
            cls.eom_began, cls.acted = asyncio.Event(), asyncio.Event()
        return cls.eom_began, cls.acted

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        name = local_part(recipient)
        if name not in ("swallow", "late"):
            return Status.CONTINUE
        logging.getLogger("pymilterkit").warning("lingering stage began")
        eom_began, acted = self.events()
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:  # swallowed: goes on past the deadline
            if name == "swallow":
                await asyncio.sleep(4)
                return Status.CONTINUE
            await asyncio.wait_for(eom_began.wait(), 20)
        try:
            self.set_reply("550", "5.7.1", "from the abandoned stage")
        except WrongStageError as exc:
            logging.getLogger("pymilterkit").warning("abandoned call refused: %s", exc)
        try:
            self.add_header("X-Abandoned", "yes")
        except WrongStageError as exc:
            logging.getLogger("pymilterkit").warning("abandoned call refused: %s", exc)
        acted.set()
        return Status.CONTINUE

    @override
    async def on_eom(self) -> Status:
        eom_began, acted = self.events()
        eom_began.set()
        await asyncio.wait_for(acted.wait(), 20)
        return Status.CONTINUE

    @override
    def on_close(self) -> None:
        logging.getLogger("pymilterkit").warning("on_close ran")


class SwallowBody(MilterSession):
    """An async on_body that ignores its cancellation for 4 s."""

    @override
    async def on_body(self, chunk: bytes) -> Status:
        logging.getLogger("pymilterkit").warning("on_body began")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(4)  # swallowed
        return Status.CONTINUE


class BusyFirstStep(MilterSession):
    """An async on_eom that blocks as long as the last `sleep-S` recipient said before its
    first await (parsing a message, say), as SlowSync's sync one does."""

    slept = 0.0

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.slept = requested_sleep(local_part(recipient)) or 0.0
        return Status.CONTINUE

    @override
    async def on_eom(self) -> Status:
        time.sleep(self.slept)
        await asyncio.sleep(0.01)
        return Status.CONTINUE


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Once the stage that asked is answered, stop `loop` and close it before the runner runs
    it again: the runner logs the stop first, so holding the log handlers' locks holds it in
    that gap (a running loop refuses to close). Says so in the log."""
    time.sleep(0.3)
    handlers = [h for name in ("pymilterkit", "") for h in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.acquire()
    try:
        loop.call_soon_threadsafe(loop.stop)
        deadline = time.monotonic() + 10
        while loop.is_running() and time.monotonic() < deadline:
            time.sleep(0.001)
        loop.close()
    finally:
        for handler in handlers:
            handler.release()
    logging.getLogger("pymilterkit").info("test filter: the event loop is closed")
