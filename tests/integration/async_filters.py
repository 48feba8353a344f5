"""Filters with `async def` stages, run by `test_async_runner.py` in their own processes."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, MilterSession, Status, noreply
from tests.helpers import delay_from_env, local_part


class AsyncRcpt(MilterSession):
    """Each recipient waits `PMK_DELAY` seconds; `bad...` is rejected; eom adds X-Rcpts."""

    actions = Actions.ADD_HEADER
    delay = delay_from_env(0)
    started_in: int | None = None

    def __init__(self) -> None:
        self.recipients: list[str] = []

    @classmethod
    @override
    async def on_worker_start(cls) -> None:
        cls.started_in = os.getpid()

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        await asyncio.sleep(self.delay)
        if local_part(recipient).startswith("bad"):
            self.set_reply("550", "5.1.1", "no such user")
            return Status.REJECT
        self.recipients.append(recipient)
        return Status.CONTINUE

    @override
    async def on_eom(self) -> Status:
        await asyncio.sleep(0)
        self.add_header("X-Rcpts", str(len(self.recipients)))
        self.add_header("X-Started-In", str(self.started_in == os.getpid()))
        return Status.CONTINUE


class AsyncEverything(MilterSession):
    """Every stage async (headers no-reply); eom reports the order the stages ran in."""

    actions = Actions.ADD_HEADER

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def _note(self, stage: str) -> Status:
        await asyncio.sleep(0.001)
        self.seen.append(stage)
        return Status.CONTINUE

    @override
    async def on_connect(self, hostname: str, address: object) -> Status:
        return await self._note("connect")

    @override
    async def on_helo(self, hostname: str) -> Status:
        return await self._note("helo")

    @override
    async def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return await self._note("mail")

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:  # a sync one among them
        self.seen.append("rcpt")
        return Status.CONTINUE

    @override
    @noreply
    async def on_header(self, name: str, value: str) -> Status:
        return await self._note("header")

    @override
    async def on_eoh(self) -> Status:
        return await self._note("eoh")

    @override
    async def on_body(self, chunk: bytes) -> Status:
        return await self._note("body")

    @override
    async def on_eom(self) -> Status:
        await self._note("eom")
        self.add_header("X-Seen", ",".join(self.seen))
        return Status.CONTINUE

    @override
    async def on_abort(self) -> None:
        await asyncio.sleep(0)

    @override
    async def on_close(self) -> None:
        await asyncio.sleep(0)


class SlowEom(MilterSession):
    """on_eom awaits `PMK_DELAY` seconds, then adds X-Slow."""

    actions = Actions.ADD_HEADER
    delay = delay_from_env(3)

    @override
    async def on_eom(self) -> Status:
        await asyncio.sleep(self.delay)
        self.add_header("X-Slow", "done")
        return Status.CONTINUE


class SlowEomSync(MilterSession):
    """`SlowEom` with a sync on_eom that blocks for the delay."""

    actions = Actions.ADD_HEADER
    delay = delay_from_env(3)

    @override
    def on_eom(self) -> Status:
        time.sleep(self.delay)
        self.add_header("X-Slow", "done")
        return Status.CONTINUE


class Deadline(MilterSession):
    """on_rcpt sleeps forever unless the recipient starts with `fast` (or `block`: it blocks
    0.4 s); records cancellation."""

    cancelled = 0

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if local_part(recipient).startswith("fast"):
            return Status.CONTINUE
        if local_part(recipient).startswith("block"):  # blocks, never suspends: not cancellable
            time.sleep(0.4)
            return Status.CONTINUE
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            type(self).cancelled += 1
            raise
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        return Status.CONTINUE


class Strays(MilterSession):
    """Async stages that fail: a stray CancelledError, an exception, a wrong result."""

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        name = local_part(recipient)
        if name.startswith("cancel"):
            raise asyncio.CancelledError
        if name.startswith("raise"):
            raise RuntimeError("lookup failed")
        if name.startswith("wrong"):
            return "yes"  # type: ignore[return-value]
        return Status.CONTINUE


class BrokenStart(MilterSession):
    """on_worker_start raises: the milter must not start."""

    @classmethod
    @override
    async def on_worker_start(cls) -> None:
        raise RuntimeError("no database")

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE


class InFlight(MilterSession):
    """Each recipient's lookup takes `PMK_DELAY` s; eom reports the most lookups seen at once."""

    actions = Actions.ADD_HEADER
    delay = delay_from_env(0.5)
    running = 0
    most = 0

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        cls = type(self)
        cls.running += 1
        cls.most = max(cls.most, cls.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            cls.running -= 1
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Most", str(type(self).most))
        return Status.CONTINUE


class Ordered(MilterSession):
    """A slow async on_rcpt whose connection may close meanwhile; close logs the order."""

    def __init__(self) -> None:
        self.rcpt_done = False

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        try:
            if local_part(recipient).startswith("slow"):
                await asyncio.sleep(delay_from_env(2))
        finally:
            self.rcpt_done = True
        return Status.CONTINUE

    @override
    def on_close(self) -> None:
        import logging

        logging.getLogger("pymilterkit").warning("closed after rcpt ended: %s", self.rcpt_done)


class NoReplyRcpt(MilterSession):
    """`@noreply async def on_rcpt` waits `PMK_DELAY` s and counts; the sync eom reports it."""

    actions = Actions.ADD_HEADER
    delay = delay_from_env(0)

    def __init__(self) -> None:
        self.count = 0

    @override
    @noreply
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        await asyncio.sleep(self.delay)
        self.count += 1
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Rcpts", str(self.count))
        return Status.CONTINUE


class FirstStep(MilterSession):
    """Where each step of its coroutines runs: the first on libmilter's thread, the rest on
    the loop's; `asyncio.current_task()` and `asyncio.timeout` work in both."""

    actions = Actions.ADD_HEADER

    def __init__(self) -> None:
        self.rcpt_thread = ""
        self.fired = False

    @override
    async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.rcpt_thread = threading.current_thread().name  # never suspends
        if local_part(recipient).startswith("late"):
            # Scheduled by a coroutine that finishes at once: the loop must still run it.
            asyncio.get_running_loop().call_later(0.05, setattr, self, "fired", True)
        return Status.CONTINUE

    @override
    async def on_eom(self) -> Status:
        before = threading.current_thread().name
        task = asyncio.current_task()
        async with asyncio.timeout(5):
            await asyncio.sleep(0.2)
        after = threading.current_thread().name
        try:  # a filter's own deadline cancels this very coroutine
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
            own_deadline = "missed"
        except TimeoutError:
            own_deadline = "kept"
        self.add_header("X-Rcpt-Thread", self.rcpt_thread)
        self.add_header("X-Eom-Threads", f"{before} {after}")
        self.add_header("X-Same-Task", str(task is asyncio.current_task() is not None))
        self.add_header("X-Own-Deadline", own_deadline)
        self.add_header("X-Fired", str(self.fired))
        return Status.CONTINUE


class OtherLayout(AsyncRcpt):
    """`AsyncRcpt` on a libmilter whose context layout pymilterkit does not know (faked: the
    layout check looks for smfi_setpriv's pointer at another offset); eom reports macro j."""

    @classmethod
    @override
    async def on_worker_start(cls) -> None:
        from pymilterkit import _libmilter_private

        _libmilter_private._CTX_PRIVDATA = 8  # ctx_sd's offset: the check fails
        await super().on_worker_start()

    @override
    async def on_eom(self) -> Status:
        self.add_header("X-J", str(self.macro("j")))
        return await super().on_eom()


class PublicLoopRcpt(AsyncRcpt):
    """`AsyncRcpt` on a Python whose asyncio internals pymilterkit does not know (faked at
    import, before the runner builds its loop): every step runs on the loop's thread."""


if os.environ.get("PMK_FAKE_ASYNCIO") == "1":
    from pymilterkit import _loop

    setattr(_loop, "_internals_problem", lambda loop: "missing loop._ready (faked)")  # noqa: B010
