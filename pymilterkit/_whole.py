"""The stage functions of a class with `on_message`: they collect the message, then hand it over.

Such a class gets the mail, rcpt, header, end-of-headers, body, end-of-message, abort and close
callbacks whether it overrides them or not (`_session.COLLECTS`; MAIL, RCPT and end of headers
no-reply unless it overrides them). Each function here collects what its stage brings into the
session's `MessageBuffer`, then runs the class's own method, as a function of the same kind (sync
or `async def`). At end of message: a message past the size limit gets `too_big` and no
`on_message`; otherwise `on_message` runs, its edits to `message.email` become actions when it
answered CONTINUE or ACCEPT, and `on_eom` runs if it answered CONTINUE. The buffer (memory and
temporary file) is closed at end of message, at abort, at close and at the next MAIL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

from ._edits import HeaderEdit
from ._errors import UndeclaredActionError
from ._flags import Actions, ProtocolOpts, Status
from ._message import DEFAULT_SPOOL_THRESHOLD, Message, MessageBuffer
from ._metrics import count_too_big
from ._session import MilterSession

__all__ = ["Spool", "collecting"]

logger = logging.getLogger("pymilterkit")
_REFUSED = (Status.REJECT, Status.TEMPFAIL)
_APPLIED = (Status.CONTINUE, Status.ACCEPT)


@dataclasses.dataclass(frozen=True)
class Spool:
    """Where messages are collected: bytes in memory, then a temporary file in `directory`;
    `max_size` (not None) overrides the class's `max_message_size`."""

    threshold: int = DEFAULT_SPOOL_THRESHOLD
    directory: str | None = None
    max_size: int | None = None


class _Collected:
    __slots__ = ("buffer", "recipients", "sender", "skipped")

    def __init__(self, buffer: MessageBuffer, sender: str) -> None:
        self.buffer = buffer
        self.sender = sender
        self.recipients: list[str] = []
        self.skipped = False  # the class's on_body answered SKIP: it gets no more chunks


def _drop(session: MilterSession, collected: _Collected | None = None) -> None:
    """Close `collected` (default: the session's message); the session forgets it only if it
    is still its message (an abandoned stage ending late leaves the next message alone)."""
    current = session._pmk_collected
    collected = current if collected is None else collected
    if collected is not None:
        if current is collected:
            session._pmk_collected = None
        collected.buffer.close()


_After = Callable[[MilterSession, Any, tuple[Any, ...], BaseException | None], Any]


def _around(
    own: Callable[..., Any] | None,
    before: Callable[..., tuple[Any, ...] | None],
    after: _After | None = None,
) -> Callable[..., Any]:
    """`own` (the class's method; None: not overridden) after `before(session, *args)`, which
    gives own's arguments (None: own is not called, the answer is CONTINUE), and before
    `after(session, result, args, failure)`, which gives the answer (told of an exception own
    raised, which goes on up); async if `own` is."""
    if own is None:

        def plain(session: MilterSession, *given: Any) -> Any:
            args = before(session, *given)
            if after is not None and args is not None:
                after(session, Status.CONTINUE, args, None)
            return Status.CONTINUE

        return plain
    if inspect.iscoroutinefunction(own):

        async def coroutine(session: MilterSession, *given: Any) -> Any:
            args = before(session, *given)
            if args is None:
                return Status.CONTINUE
            try:
                result = await own(session, *args)
            except BaseException as exc:
                if after is not None:
                    after(session, None, args, exc)
                raise
            return result if after is None else after(session, result, args, None)

        return coroutine

    def function(session: MilterSession, *given: Any) -> Any:
        args = before(session, *given)
        if args is None:
            return Status.CONTINUE
        try:
            result = own(session, *args)
        except BaseException as exc:
            if after is not None:
                after(session, None, args, exc)
            raise
        return result if after is None else after(session, result, args, None)

    return function


def collecting(
    cls: type[MilterSession], stage: str, spool: Spool,
    error_status: Status = Status.TEMPFAIL, timeout_status: Status = Status.TEMPFAIL,
) -> Callable[..., Any]:
    """The function to run for `stage` of `cls` (a class with `on_message`); the runner's
    error and timeout statuses tell which recipients a failed on_rcpt leaves accepted."""
    own = getattr(cls, stage)
    if own is getattr(MilterSession, stage):
        own = None
    asynchronous = own is not None and inspect.iscoroutinefunction(own)
    kept_after_error, kept_after_timeout = (
        status not in _REFUSED for status in (error_status, timeout_status))
    space = bool(cls._pmk_space)
    # RCPT_REJ: the MTA also passes the recipients it refused itself, marked by {rcpt_mailer}
    refused_too = bool(cls.negotiation().protocol & ProtocolOpts.RCPT_REJ)

    def mail(session: MilterSession, sender: str, params: Any) -> tuple[Any, ...]:
        _drop(session)
        limit = spool.max_size if spool.max_size is not None else cls.max_message_size
        buffer = MessageBuffer(spool.threshold, spool.directory, limit)
        session._pmk_collected = _Collected(buffer, sender)
        return sender, params

    def header(session: MilterSession, name: str, value: str) -> tuple[Any, ...]:
        _buffer(session).header(name, value)
        return name, value[1:] if space and value[:1] == " " else value

    def eoh(session: MilterSession) -> tuple[Any, ...]:
        _buffer(session).end_of_headers()
        return ()

    def body(session: MilterSession, chunk: bytes) -> tuple[Any, ...] | None:
        _buffer(session).body(chunk)
        return None if session._pmk_collected.skipped else (chunk,)

    def skip(session: MilterSession, result: Any, args: tuple[Any, ...],
             failure: BaseException | None) -> Any:
        """The class's SKIP ends its own body chunks, not the message's collection (and a
        stage answered at its deadline ends nothing)."""
        collected = session._pmk_collected
        if result is not Status.SKIP or collected is None or _cancelled(asynchronous):
            return result
        collected.skipped = True
        return Status.CONTINUE

    def rcpt(session: MilterSession, result: Any, args: tuple[Any, ...],
             failure: BaseException | None) -> Any:
        """Keep a recipient the answer sent accepts: past its deadline the timeout status
        (whatever the method returns after), after an exception or an invalid result the
        error status, else the result; and not one the MTA refused itself."""
        collected = session._pmk_collected
        if collected is None:
            return result
        if _cancelled(asynchronous):
            kept = kept_after_timeout
        elif failure is not None or result.__class__ is not Status:
            kept = kept_after_error or result is Status.NOREPLY  # (NOREPLY: sent CONTINUE)
        else:
            kept = result not in _REFUSED
        if kept and not (refused_too and session.macro("{rcpt_mailer}") == "error"):
            collected.recipients.append(args[0])
        return result

    def cleanup(session: MilterSession) -> tuple[Any, ...]:
        _drop(session)
        return ()

    if stage == "on_eom":
        return _end_of_message(cls, own)
    before: dict[str, Callable[..., tuple[Any, ...] | None]] = {
        "on_mail": mail, "on_rcpt": lambda session, *args: args, "on_header": header,
        "on_eoh": eoh, "on_body": body, "on_abort": cleanup, "on_close": cleanup,
    }
    return _around(own, before[stage], {"on_rcpt": rcpt, "on_body": skip}.get(stage))


def _cancelled(asynchronous: bool) -> bool:
    """Whether the running async stage was cancelled (its deadline, or a hang-up)."""
    if not asynchronous:
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _buffer(session: MilterSession) -> MessageBuffer:
    collected = session._pmk_collected
    if collected is None:  # no MAIL seen (a harness driving stages by hand)
        collected = session._pmk_collected = _Collected(MessageBuffer(), "")
    buffer: MessageBuffer = collected.buffer
    return buffer


def _end_of_message(
    cls: type[MilterSession], own: Callable[..., Any] | None
) -> Callable[..., Any]:
    on_message = cls.on_message

    def start(session: MilterSession) -> Message | Status:
        buffer = _buffer(session)
        collected = session._pmk_collected
        if buffer.too_big:
            return _too_big(cls, session, buffer)
        return Message(buffer, collected.sender, collected.recipients, session.macro("i"))

    if "on_eom" not in cls._pmk_spec.asynchronous:

        def eom(session: MilterSession) -> Any:
            _buffer(session)
            collected = session._pmk_collected
            try:
                message = start(session)
                if isinstance(message, Status):
                    return message
                status = on_message(session, message)
                _apply(session, message, status)
                if status is Status.CONTINUE and own is not None:
                    return own(session)
                return status
            finally:
                _drop(session, collected)

        return eom

    async def eom_async(session: MilterSession) -> Any:
        _buffer(session)
        collected = session._pmk_collected
        try:
            message = start(session)
            if isinstance(message, Status):
                return message
            status = on_message(session, message)
            if inspect.isawaitable(status):
                status = await status
            _apply(session, message, status)
            if status is Status.CONTINUE and own is not None:
                status = own(session)
                if inspect.isawaitable(status):
                    status = await status
            return status
        finally:  # only this message's: past its deadline the next one may be collecting
            _drop(session, collected)

    return eom_async


def _too_big(cls: type[MilterSession], session: MilterSession, buffer: MessageBuffer) -> Status:
    status = cls.too_big
    count_too_big()
    logger.info(
        "message past max_message_size (%s bytes): not filtered, answering %s",
        buffer.limit, status.name, extra={"pmk_session": session, "pmk_stage": "on_eom"},
    )
    if status is Status.REJECT:
        session.set_reply("552", "5.3.4", "Message too big for the content filter")
    return status


_FLAG = {"change": Actions.CHANGE_HEADER, "delete": Actions.CHANGE_HEADER,
         "insert": Actions.ADD_HEADER, "add": Actions.ADD_HEADER}


def _describe(edit: HeaderEdit) -> str:
    where = f" at position {edit.index}" if edit.kind == "insert" else (
        f" #{edit.index}" if edit.index else "")
    return f"{edit.kind} header {edit.name}{where}"


def _apply(session: MilterSession, message: Message, status: object) -> None:
    """Turn the edits of `message.email` into actions, all checked against the declared
    actions before the first is sent."""
    if status not in _APPLIED:
        return
    edits, body = message.edits()
    declared = session._pmk_actions
    for edit in edits:
        flag = _FLAG[edit.kind]
        if not flag & declared:
            action = "change_header" if flag is Actions.CHANGE_HEADER else (
                "insert_header" if edit.kind == "insert" else "add_header")
            raise UndeclaredActionError(
                f"message.email was edited ({_describe(edit)}): {action}() needs "
                f"Actions.{flag.name} in the class's `actions` (declared: {declared!r})"
            )
    if body is not None and not Actions.CHANGE_BODY & declared:
        raise UndeclaredActionError(
            f"message.email's body was changed: replace_body() needs Actions.CHANGE_BODY in "
            f"the class's `actions` (declared: {declared!r})"
        )
    strip = 1 if session._pmk_space else 0  # the session's action methods put the space back
    for edit in edits:
        value = edit.value[strip:] if edit.value[:1] == " " else edit.value
        if edit.kind == "change":
            session.change_header(edit.name, value, edit.index)
        elif edit.kind == "delete":
            session.change_header(edit.name, None, edit.index)
        elif edit.kind == "insert":  # the MTA counts its own Received: (unseen) first
            session.insert_header(edit.index + 1, edit.name, value)
        else:
            session.add_header(edit.name, value)
    if body is not None:
        session.replace_body(body)
