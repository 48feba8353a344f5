"""The rule set of sessions, run by both libmilter's callbacks and the test harness.

Creating a session, running a stage (`SessionRules.stage_callback`: the one path both take for
every command), the error policy (an exception is logged and answered with the error status; a
result that is not a `Status` likewise; only KeyboardInterrupt and SystemExit are fatal, any
other BaseException is an error like an Exception), negotiation, and abort/close semantics live
here once, so the harness in `pymilterkit.testing` cannot drift from what runs in production.

Theory of operation
-------------------
A stage's `Status` goes from the user's method to the wire through calls chosen when the
callbacks are built, never at run time: the plain callback (`_sync_callback` or
`_async_callback`) runs the method and checks its result; with dry-run, `DryRun.verdicts`
wraps it (a verdict is logged and CONTINUE sent); with metrics, `Meter.timed` wraps that (the
answer the MTA gets is counted). With `--record`, the plain callback of a sampled
connection's stage calls the recorder's `note` before the method and puts the answer in the
line it made. Each feature is an object handed to `SessionRules` (`meter`, `dry_run`, `recorder`),
which also asks it about sessions, errors and timeouts; when a feature is off, its object is
None and the callback is the plain one.

Every stage callback writes its connection's key into its thread's `Entry` before it looks the
session up, and clears it when it returns; a stop (`_trampolines.LibmilterCallbacks.close_all`)
that has taken a session out of reach reads every thread's entry (`keys_inside`) to know
whether a callback may still be about to run in it. A slot of an object the thread already
holds costs a stage callback far less than a dict of connections would (two dict operations
per command), and the stop, which is rare, does the looking.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._flags import Actions, ProtocolOpts, Status
from ._logging import install as _install_log_fields
from ._protocol import (
    ENDS_MESSAGE,
    NO_STAGE_MASK,
    NOREPLY_MASK,
    STAGES,
    ActionInfo,
    BackendWrapper,
    SessionBackend,
)
from ._session import COLLECTS, MilterSession
from ._types import EsmtpParams
from ._whole import Spool, collecting

if TYPE_CHECKING:
    from ._dryrun import DryRun
    from ._metrics import Meter
    from ._record import Recorder

__all__ = [
    "CONNECTION_STAGES", "MTA_TIMEOUTS", "NO_PARAMS", "Entry", "Expired", "SessionRules", "entries",
    "keys_inside",
]

logger = logging.getLogger("pymilterkit")

CONNECTION_STAGES = frozenset(info.method for info in STAGES if info.connection)
MTA_TIMEOUTS: dict[str, str] = {
    info.method: "Postfix's milter_content_timeout (300 s by default)"
    if info.method in ("on_header", "on_eoh", "on_body", "on_eom")
    else "Postfix's milter_command_timeout (30 s by default)"
    for info in STAGES
}
"""The MTA's wait a running stage is about to pass, named in deadline warnings (Sendmail's
default is 10 s for every reply: `T=R:10s`)."""
NO_PARAMS = EsmtpParams()  # read-only: one instance serves every address without parameters


class _AfterPending(Mapping[Any, MilterSession]):
    """`sessions`, where a look-up first waits for the session's pending async stage (a
    @noreply one, or a peer that did not wait), so a sync stage never overlaps it: classes with
    async stages only."""

    def __init__(self, sessions: Mapping[Any, MilterSession]) -> None:
        self.sessions = sessions

    def __getitem__(self, key: Any) -> MilterSession:
        session = self.sessions[key]
        pending = session._pmk_pending
        if pending is not None:
            pending.wait()
        return session

    def __iter__(self) -> Iterator[Any]:
        return iter(self.sessions)

    def __len__(self) -> int:
        return len(self.sessions)


def _no_stage_macros(key: Any, slot: int) -> list[bytes] | None:
    """The macros the MTA sent for macro stage `slot` (SMFIM_*) of connection `key`, names and
    values alternating (None: not known; a recording then notes those read). `SessionRules`'
    `stage_macros`; the runner's reads them from libmilter's context."""
    return None


class Entry:
    """A thread's mark: the key of the connection whose stage callback it is in (None: none;
    libmilter's keys are ints ctypes makes for each call, so one call's key is its own object),
    and `watched`: a lock the deadline watcher holds while it reads that connection's macros;
    the callback waits for it after clearing `key` (`_trampolines.Watchman`), so it cannot
    return to libmilter meanwhile."""

    __slots__ = ("__weakref__", "key", "watched")

    def __init__(self) -> None:
        self.key: Any = None
        self.watched: threading.Lock | None = None


def _watched(entry: Entry) -> None:
    """Wait until the watcher that reads what `entry`'s callback was in is done."""
    watched = entry.watched
    if watched is not None:
        with watched:
            pass


_here = threading.local()
"""Per thread state (as libmilter's threads keep theirs: `_threadstate`): its `Entry`."""
_entries: weakref.WeakSet[Entry] = weakref.WeakSet()  # every thread's, while the thread lives
_entries_lock = threading.Lock()


def _entry(pin: Callable[[], object]) -> Entry:
    """This thread's entry, made at its first stage callback (after `pin()`, which keeps a
    libmilter thread's thread state, and so its entry, across callbacks)."""
    pin()
    entry = _here.entry = Entry()
    with _entries_lock:
        _entries.add(entry)
    return entry


def entries() -> list[Entry]:
    """Every thread's entry."""
    with _entries_lock:
        return list(_entries)


def keys_inside() -> set[Any]:
    """The keys of the connections some thread is in a stage callback of, now."""
    return {key for entry in entries() if (key := entry.key) is not None}


def _nothing() -> None:
    pass


def _nothing_of(_: Any) -> None:
    pass


_FATAL = (KeyboardInterrupt, SystemExit)  # the only exceptions that stop the milter
_session_numbers = itertools.count(1)
_DATA_OR_HEADERS_OFF = ProtocolOpts.NO_DATA | ProtocolOpts.NO_HDRS
_FAIL_OPEN = frozenset((Status.CONTINUE, Status.ACCEPT))  # answers that deliver the message
_STAGE_BITS = int(NO_STAGE_MASK | NOREPLY_MASK)  # left out or kept by libmilter, never refused


class SessionRules:
    """Drives sessions of one class with the runner's rules; subclasses supply the transport."""

    def __init__(
        self,
        session_class: type[MilterSession],
        error_status: Status,
        *,
        tcp: bool = False,
        deadlines: Mapping[str, float | None] | None = None,
        timeout_status: Status = Status.TEMPFAIL,
        meter: Meter | None = None,
        dry_run: DryRun | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        # Log lines carry untrusted input (exception texts, recipients): escape control
        # characters. Records about a session get its fields (id, queue id, stage, client) when
        # emitted. Here, not at import: importing pymilterkit changes no logger.
        _install_log_fields(logger)
        self.session_class = session_class
        self.spec = session_class.negotiation()
        self.error_status = error_status
        self.asynchronous = self.spec.asynchronous  # async def stages
        self.deadlines: Mapping[str, float | None] = deadlines or {}
        """Seconds each stage method may run (absent or None: no limit): an async one is then
        cancelled, a sync one logged (`_trampolines.Watchman`)."""
        self.timeout_status = timeout_status
        self.noreply = frozenset(self.spec.noreply)  # @noreply stages: nothing is sent back
        # On TCP, Postfix sends the DATA stage's macros even when DATA is negotiated away, as a
        # packet of its own that the milter never answers; its next packet (end of message) then
        # waits for the ACK of that one (Nagle on the MTA's side), which the milter's kernel
        # delays by ~40 ms: every message. So on TCP the DATA stage is kept and answered
        # (CONTINUE): the macros travel with the command and the reply carries the ACK. Asking
        # for no DATA macros does not help: Postfix still sends an empty macro packet.
        # No-reply stages are kept on TCP: measured through Postfix, none of them stalls once
        # DATA is answered, and they save the MTA a round trip each (docs/performance.md).
        self.answer_data = tcp and "on_data" not in self.spec.stages
        self.created = 0
        self.meter = meter
        """Counts answers, errors, timeouts, sessions and actions (None: metrics off)."""
        self.dry_run = dry_run
        """Logs verdicts and modifications instead of sending them (None: off)."""
        self.recorder = recorder
        """Notes what sampled connections saw and did, for `--record` (None: off)."""
        self._methods: dict[str, Callable[..., Any]] = {}
        self._spool = Spool()
        self.fail_open = "on_eom" in self.spec.stages and bool(
            {error_status, timeout_status} & _FAIL_OPEN)
        """An on_eom that fails would be answered so that the message is delivered: its
        modifications are noted (`_Modifications`), and once it sent one it is answered TEMPFAIL
        instead (`whole_or_nothing`)."""
        tracked = "on_abort" in self.spec.stages
        self.as_returned = frozenset(
            () if meter or dry_run or recorder else
            (stage for stage in self.asynchronous if stage not in self.noreply
             and (not tracked or stage in CONNECTION_STAGES))
        )
        """The async stages whose returned Status is their answer as it is (what `settle` and
        `answered` would do to it): not @noreply, no abort bookkeeping, no metrics, dry-run or
        recording."""

    @property
    def spool(self) -> Spool:
        """Where a class with on_message collects messages (the runner sets it)."""
        return self._spool

    @spool.setter
    def spool(self, spool: Spool) -> None:
        self._spool, self._methods = spool, {}

    def method(self, stage: str) -> Callable[..., Any]:
        """What runs for `stage`: the class's method, or its collector with on_message."""
        found = self._methods.get(stage)
        if found is None:
            if "on_message" in self.spec.stages and stage in COLLECTS:
                found = collecting(self.session_class, stage, self.spool, self.error_status,
                                   self.timeout_status)
            else:
                found = getattr(self.session_class, stage)
            self._methods[stage] = found
        return found

    # -- hooks -----------------------------------------------------------------------------

    def report_error(
        self, exc: BaseException, stage: str, session: MilterSession | None = None
    ) -> None:
        """An exception escaped a stage method: log it with its traceback."""
        if stage in ("on_abort", "on_close"):
            then = "nothing to answer"  # (libmilter answers neither)
        elif stage == "on_negotiate":
            then = "refusing the connection"
        elif stage in self.noreply:
            then = "not answered (@noreply)"
        else:
            then = f"answering {self.error_status.name}"
        logger.error(
            "%s.%s raised %s; %s",
            self.session_class.__qualname__,
            stage,
            type(exc).__name__,
            then,
            exc_info=exc,
            extra={"pmk_session": session, "pmk_stage": stage},
        )

    def fatal(self, exc: BaseException, stage: str) -> None:
        """KeyboardInterrupt/SystemExit in a stage method; the runner stops the milter."""
        logger.warning("%s in %s: stopping the milter", type(exc).__name__, stage)

    @property
    def cancelled(self) -> str:
        """What a deadline meant for an async stage that was answered."""
        return f"cancelled, answering {self.timeout_status.name}"

    def timed_out(self, stage: str, elapsed: float, what: str, session: object = None) -> None:
        """A stage ran past its deadline: count and log it (`what` it meant)."""
        if self.meter is not None:
            self.meter.timeout(stage)
        mta = MTA_TIMEOUTS.get(stage)
        logger.warning(
            "%s.%s still running after %.3f s, past its deadline (%g s): %s%s",
            self.session_class.__qualname__,
            stage,
            elapsed,
            self.deadlines.get(stage),
            what,
            f"; the MTA gives up at {mta}" if mta else "",
            extra={"pmk_session": session, "pmk_stage": stage},
        )

    def answered(self, stage: str, answer: int, session: MilterSession, elapsed: float) -> int:
        """What goes to the MTA for an async stage's `answer` (`elapsed` s after it began):
        dry-run replaces a verdict, then metrics count what is sent (as the sync callbacks'
        wrappers do); a recording notes the filter's own answer first."""
        if self.recorder is not None:
            self.recorder.answered(session, stage, answer, elapsed)
        if self.dry_run is not None:
            answer = self.dry_run.verdict(stage, answer, session)
        if self.meter is not None:
            self.meter.record(stage, answer, elapsed)
        return answer

    def run_coroutine(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run an async stage method's coroutine to its end and return its result.

        The harness runs it on its own loop; the runner on the milter's event loop.
        """
        raise NotImplementedError

    # -- the policy ------------------------------------------------------------------------

    def create(self, backend: SessionBackend) -> MilterSession:
        """A new session for a connection, attached to `backend` (behind the counting and
        dry-run backends when those are on)."""
        if self.meter is not None:
            backend = self.meter.backend(backend)
        session = self.session_class()
        if self.fail_open:  # under dry-run: what it only logs is not sent
            backend = _Modifications(backend, session)
        if self.dry_run is not None:
            backend = self.dry_run.backend(backend, session)
        if self.recorder is not None:
            backend = self.recorder.backend(backend, session)
        self.attach(session, backend)
        session._pmk_id = next(_session_numbers)  # in this process: its logs' session id
        self.created += 1
        if self.meter is not None:
            self.meter.opened()
        return session

    def attach(self, session: MilterSession, backend: SessionBackend) -> None:
        """Attach `session` to its connection's `backend`, with the class's actions."""
        session._pmk_backend = backend
        session._pmk_actions = self.spec.actions
        session._pmk_in_message = False

    @staticmethod
    def enter(session: MilterSession, stage: str | None) -> None:
        """Mark `stage` as the one `session` runs (None: none): actions check it."""
        session._pmk_stage = stage

    def fail(
        self, exc: BaseException, stage: str, session: MilterSession | None = None
    ) -> int:
        """The answer after `exc` escaped `stage`.

        Only KeyboardInterrupt and SystemExit stop the milter. Any other BaseException
        (asyncio.CancelledError from a cancelled task, GeneratorExit, a custom subclass) is
        an error of this stage like an Exception: logged and answered with the error status.
        """
        if self.meter is not None:
            self.meter.error(stage)
        if isinstance(exc, _FATAL):
            self.fatal(exc, stage)
        else:
            self.report_error(exc, stage, session)
        if stage in self.noreply:
            return Status.NOREPLY
        return self.whole_or_nothing(session, stage, self.error_status)

    def whole_or_nothing(self, session: MilterSession | None, stage: str, answer: int) -> int:
        """`answer` to a failed stage, unless it is on_eom's, would deliver the message, and
        the stage already sent modifications: then TEMPFAIL (the MTA keeps the message and
        tries again), as no half-changed message may be delivered."""
        if stage != "on_eom" or answer not in _FAIL_OPEN or session is None \
                or not session._pmk_modified:
            return answer
        logger.warning(
            "%s.on_eom failed after it sent modifications: answering TEMPFAIL, not %s, so no "
            "half-changed message is delivered",
            self.session_class.__qualname__, Status(answer).name,
            extra={"pmk_session": session, "pmk_stage": stage},
        )
        return Status.TEMPFAIL

    def bad_result(
        self, result: object, stage: str, session: MilterSession | None = None
    ) -> int:
        """The answer when `stage` returned something that is not a sendable Status."""
        if self.meter is not None and result is not Status.NOREPLY:  # NOREPLY: only corrected
            self.meter.error(stage)
        extra = {"pmk_session": session, "pmk_stage": stage}
        if isinstance(result, Awaitable):
            if isinstance(result, Coroutine):
                result.close()  # never run: no "coroutine was never awaited" warning either
            logger.error(
                "%s.%s returned %r: declare it `async def` (a decorator may hide that: "
                "mark its wrapper with inspect.markcoroutinefunction); answering %s",
                self.session_class.__qualname__,
                stage,
                result,
                self.error_status.name,
                extra=extra,
            )
            return self.whole_or_nothing(session, stage, self.error_status)
        if result is Status.NOREPLY:
            logger.warning(
                "%s.%s returned NOREPLY but the stage is not @noreply; sending CONTINUE",
                self.session_class.__qualname__,
                stage,
                extra=extra,
            )
            return Status.CONTINUE
        logger.error(
            "%s.%s returned %r, not a Status; answering %s",
            self.session_class.__qualname__,
            stage,
            result,
            self.error_status.name,
            extra=extra,
        )
        return self.whole_or_nothing(session, stage, self.error_status)

    def stage_callback(
        self,
        stage: str,
        sessions: Mapping[Any, MilterSession],
        create: Callable[[Any], MilterSession | None],
        convert: Callable[..., tuple[Any, ...]] | None = None,
        *,
        envelope: bool = False,
        pin: Callable[[], object] = _nothing,
    ) -> Callable[..., int]:
        """The function that runs reply-giving `stage` for a connection: `callback(key, a, b)`.

        libmilter's callbacks (`_trampolines`, key: the SMFICTX) and the harness (key: unused)
        run this same code: the session is looked up in `sessions`, made by `create(key)` if
        there is none (a new connection after QUIT_NC; None while the runner stops: answered
        TEMPFAIL), the stage is marked on the session (the actions' stage checks read it), the
        method runs, and the error policy, the abort guard and the result check follow.
        `convert(a, b)` turns the caller's arguments (at most two after the key, as libmilter
        passes them; a missing one is None) into the method's (None: it takes none);
        `envelope`: `convert` is the argv decoder of MAIL/RCPT (`convert(a)`), whose common
        case (an address without parameters) is inlined. `pin()` runs at a thread's first
        callback (libmilter's threads: see `_threadstate`).

        The plain callback's answer goes through dry-run's and then the meter's wrapper when
        those are on; an async stage's through `answered`.
        """
        plain = self._async_callback if stage in self.asynchronous else self._sync_callback
        recorded = None if self.recorder is None else self.recorder.stage(
            stage, convert, envelope, self.stage_macros)
        callback = plain(stage, sessions, create, convert, envelope, pin, recorded)
        if self.dry_run is not None:
            callback = self.dry_run.verdicts(stage, callback, sessions)
        if self.meter is not None and stage not in self.asynchronous:  # async: `answered`
            callback = self.meter.timed(stage, callback)
        if stage == "on_eom" and self.fail_open:
            callback = _noting_modifications(callback, sessions)
        return callback

    def _sync_callback(
        self,
        stage: str,
        sessions: Mapping[Any, MilterSession],
        create: Callable[[Any], MilterSession | None],
        convert: Callable[..., tuple[Any, ...]] | None,
        envelope: bool,
        pin: Callable[[], object],
        recorded: Callable[..., Any] | None = None,
    ) -> Callable[..., int]:
        """The plain callback of a sync stage (see `stage_callback`); `recorded`: the
        recorder's `note` for the stage (`Recorder.stage`), which a recorded connection's call
        runs before the method (its line then gets the answer and the time here).

        Every choice that depends only on the stage is made here, once: the callback runs for
        every command, so each Python call, attribute and dict operation on it costs
        throughput (`benchmarks/instructions.py`).
        """
        fail, bad, here, first_entry = self.fail, self.bad_result, _here, _entry
        note, clock = recorded, time.perf_counter
        message_ended: Callable[[Any], None] = (
            _nothing_of if self.recorder is None else self.recorder.message_ended)
        method = self.method(stage)
        if self.asynchronous:  # a sync stage may follow an async one not yet answered
            sessions = _AfterPending(sessions)
        noreply = stage in self.noreply
        # Which results end the message matters only to on_abort (run inside a message).
        track = "on_abort" in self.spec.stages and stage not in CONNECTION_STAGES
        is_rcpt, is_eom = stage == "on_rcpt", stage == "on_eom"
        no_params, status_type, status_noreply = NO_PARAMS, Status, Status.NOREPLY

        def callback(key: Any, a: Any = None, b: Any = None) -> int:
            try:  # __dict__[...]: a thread-local's dict is reached faster than its attributes
                entry = here.__dict__["entry"]
            except KeyError:  # this thread's first callback
                entry = first_entry(pin)
            entry.key = key  # before the look-up: see the module's docstring
            try:
                try:
                    session = sessions[key]  # a subscript: cheaper than a call of .get
                except KeyError:  # after QUIT_NC: a new connection on the same context
                    try:
                        new = create(key)
                    except BaseException as exc:  # noqa: BLE001 - nothing may reach C
                        return fail(exc, stage)
                    if new is None:  # stopping: no new sessions
                        return status_type.TEMPFAIL
                    session = new
                line = None
                if note is not None and (log := session._pmk_log) is not None:  # recorded
                    line = note(log, key, a, b)
                session._pmk_stage = stage
                result: int  # (an annotation only: no code)
                try:
                    if envelope:
                        first = a[0]  # never NULL: libmilter aborts a command it cannot split
                        if first is not None and a[1] is None:  # an address, no parameters
                            address = first.decode("utf-8", "surrogateescape")
                            result = method(session, address, no_params)
                        else:
                            result = method(session, *convert(a))  # type: ignore[misc]
                    elif convert is None:
                        result = method(session)
                    else:
                        result = method(session, *convert(a, b))
                except BaseException as exc:  # noqa: BLE001 - nothing may reach C
                    session._pmk_stage = None
                    result = fail(exc, stage, session)
                else:
                    session._pmk_stage = None
                    if noreply:  # whatever it returned, the MTA goes on
                        result = status_noreply
                    elif result.__class__ is not status_type or result is status_noreply:
                        result = bad(result, stage, session)
                if track:  # from the answer sent, not the method's result
                    session._pmk_in_message = not (
                        is_eom or (result in ENDS_MESSAGE and not is_rcpt)
                    )
                if line is not None:  # recorded: the answer and the time in the stage's line
                    line[3], line[4] = int(result), clock() - log.start
                    if is_eom:
                        message_ended(log)
                return result
            finally:
                entry.key = None  # then `watched`, in this order: see `Entry`
                if entry.watched is not None:
                    _watched(entry)

        return callback

    # -- async def stages --------------------------------------------------------------------

    def _async_callback(
        self,
        stage: str,
        sessions: Mapping[Any, MilterSession],
        create: Callable[[Any], MilterSession | None],
        convert: Callable[..., tuple[Any, ...]] | None,
        envelope: bool,
        pin: Callable[[], object],
        recorded: Callable[..., Any] | None = None,
    ) -> Callable[..., int]:
        """The plain callback of an `async def` stage: the coroutine goes to `answer_async`
        (a recorded connection's call is noted first; its answer comes to `answered`).

        Same session rules as the sync callback; the result is checked by `settle` when the
        coroutine is done, which may be after the callback returned.
        """
        method = self.method(stage)
        fail, answer, here, first_entry = self.fail, self.answer_async, _here, _entry
        no_params = NO_PARAMS
        note = recorded

        def callback(key: Any, a: Any = None, b: Any = None) -> int:
            try:  # __dict__[...]: a thread-local's dict is reached faster than its attributes
                entry = here.__dict__["entry"]
            except KeyError:  # this thread's first callback
                entry = first_entry(pin)
            entry.key = key  # before the look-up: see the module's docstring
            try:
                try:
                    session = sessions[key]
                except KeyError:
                    try:
                        new = create(key)
                    except BaseException as exc:  # noqa: BLE001 - nothing may reach C
                        return fail(exc, stage)
                    if new is None:
                        return Status.TEMPFAIL
                    session = new
                pending = session._pmk_pending
                if pending is not None:  # a peer that did not wait for the previous answer
                    pending.wait()
                if note is not None and (log := session._pmk_log) is not None:  # recorded
                    note(log, key, a, b)
                session._pmk_stage = stage
                try:
                    if envelope:
                        first = a[0]  # never NULL: libmilter aborts a command it cannot split
                        if first is not None and a[1] is None:  # an address, no parameters
                            address = first.decode("utf-8", "surrogateescape")
                            coro = method(session, address, no_params)
                        else:
                            coro = method(session, *convert(a))  # type: ignore[misc]
                    elif convert is None:
                        coro = method(session)
                    else:
                        coro = method(session, *convert(a, b))
                except BaseException as exc:  # noqa: BLE001
                    session._pmk_stage = None
                    return fail(exc, stage, session)
                return answer(key, session, stage, coro)
            finally:
                entry.key = None  # then `watched`, in this order: see `Entry`
                if entry.watched is not None:
                    _watched(entry)

        return callback

    @staticmethod
    def wait_pending(session: MilterSession) -> None:
        """Wait until `session`'s previous async stage is answered (a peer that did not wait)."""
        pending = session._pmk_pending
        if pending is not None:
            pending.wait()

    def answer_async(
        self, key: Any, session: MilterSession, stage: str, coro: Coroutine[Any, Any, Any]
    ) -> int:
        """Await `coro` (an async `stage` of `session`) and return the answer.

        The runner overrides this to answer after the callback returned (`_trampolines`).
        """
        start = time.perf_counter()
        answer = self.settle(session, stage, self.run_coroutine(self.bounded(coro, stage)))
        return self.answered(stage, answer, session, time.perf_counter() - start)

    async def bounded(self, coro: Coroutine[Any, Any, Any], stage: str) -> tuple[bool, Any]:
        """`coro`'s outcome, (True, result) or (False, exception), cancelled past the stage's
        deadline (then the exception is an `Expired`). The runner's stages arm their deadline
        only if they suspend (`_trampolines._Pending`): this costs a timeout scope each."""
        limit = self.deadlines.get(stage)
        start = time.monotonic()
        try:
            if limit is None:
                return (True, await coro)
            async with asyncio.timeout(limit) as scope:
                result = await coro
            if scope.expired():  # it caught the cancellation and returned anyway
                return (False, Expired(time.monotonic() - start))
            return (True, result)
        except TimeoutError as exc:
            if limit is not None and scope.expired():
                return (False, Expired(time.monotonic() - start))
            return (False, exc)
        except BaseException as exc:  # noqa: BLE001 - the error policy decides
            return (False, exc)

    def settle(self, session: MilterSession, stage: str, outcome: tuple[bool, Any]) -> int:
        """The answer to send for an async stage's outcome; ends the stage on `session`.

        The same rules as the sync callback's tail: errors, timeouts, the abort guard, no-reply
        stages and the result check.
        """
        ok, value = outcome
        session._pmk_stage = None
        answer: int
        if not ok:
            if isinstance(value, Expired):
                self.timed_out(stage, value.elapsed, self.cancelled, session)
                answer = Status.NOREPLY if stage in self.noreply else self.whole_or_nothing(
                    session, stage, self.timeout_status)
            else:
                answer = self.fail(value, stage, session)
        elif stage in self.noreply:
            answer = Status.NOREPLY
        elif value.__class__ is Status and value is not Status.NOREPLY:
            answer = int(value)
        else:
            answer = self.bad_result(value, stage, session)
        if "on_abort" in self.spec.stages and stage not in CONNECTION_STAGES:
            # from the answer sent (an error's, a deadline's), not the method's result
            session._pmk_in_message = not (
                stage == "on_eom" or (answer in ENDS_MESSAGE and stage != "on_rcpt")
            )
        return answer

    stage_macros: Callable[[Any, int], list[bytes] | None] = staticmethod(_no_stage_macros)

    @staticmethod
    def in_stage(session: MilterSession) -> str | None:
        """The stage method `session` is running, if any."""
        return session._pmk_stage

    def negotiate(
        self,
        session: MilterSession,
        offered_actions: int,
        offered_opts: int,
        setsymlist: Callable[[int, bytes], object],
    ) -> tuple[int, int, int]:
        """Run on_negotiate; returns (status, actions, protocol options) for libmilter."""
        try:
            session._pmk_stage = "on_negotiate"
            try:
                status, actions, opts = session.on_negotiate(
                    Actions(offered_actions), ProtocolOpts(offered_opts)
                )
            finally:
                session._pmk_stage = None
            if status is not Status.CONTINUE:
                logger.info(
                    "on_negotiate answered %s: refusing the connection",
                    status.name,
                    extra={"pmk_session": session, "pmk_stage": "on_negotiate"},
                )
                return int(status), 0, 0
            if self.answer_data:
                opts = ProtocolOpts(int(opts) & ~int(ProtocolOpts.NO_DATA))
            if opts & ProtocolOpts.NO_EOH and not opts & _DATA_OR_HEADERS_OFF:
                # libmilter's state machine (trans_ok) goes from DATA to the body only past a
                # header or end of headers: after DATA, the body of a message without header
                # lines would go unanswered (the MTA times out). Keep end of headers, unanswered.
                opts = (opts & ~ProtocolOpts.NO_EOH) | ProtocolOpts.NR_EOH
            missing = Actions(int(actions) & ~offered_actions)
            if missing:
                logger.error(
                    "the MTA does not offer actions %r that %s needs; it will drop the "
                    "connection",
                    missing,
                    self.session_class.__qualname__,
                    extra={"pmk_session": session, "pmk_stage": "on_negotiate"},
                )
            lacking = ProtocolOpts(int(opts) & ~offered_opts & ~_STAGE_BITS)
            if lacking:  # libmilter drops the connection ("does not fulfill protocol ...")
                logger.error(
                    "the MTA does not offer protocol options %r that %s needs%s; it will drop "
                    "the connection",
                    lacking,
                    self.session_class.__qualname__,
                    " (on_message: the header values exactly as received)"
                    if lacking & ProtocolOpts.HDR_LEADSPC and "on_message" in self.spec.stages
                    else "",
                    extra={"pmk_session": session, "pmk_stage": "on_negotiate"},
                )
            session._pmk_actions = Actions(actions)
            for where, names in self.spec.macros.items():
                setsymlist(int(where), " ".join(names).encode("ascii"))
            if self.dry_run is not None:  # the MTA is asked for no action but macros
                actions &= Actions.SETSYMLIST
            return Status.CONTINUE, int(actions), int(opts)
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc, "on_negotiate", session)
            # Anything but CONTINUE: libmilter drops the connection.
            return Status.TEMPFAIL, 0, 0

    def abort(self, session: MilterSession) -> None:
        """on_abort, only while a message this filter saw is in progress (and only once).

        Postfix sends abort after every message, and libmilter may pass it on after eom.
        """
        self.wait_pending(session)
        if session._pmk_in_message:
            session._pmk_in_message = False
            self.cleanup(session, "on_abort")

    def close(self, session: MilterSession) -> None:
        """on_close, then detach the session from its connection for good."""
        try:
            self.cleanup(session, "on_close")
        finally:
            session._pmk_backend = None
            if self.meter is not None:
                self.meter.closed()
            if self.recorder is not None:
                self.recorder.closed(session)

    def cleanup(self, session: MilterSession, stage: str) -> None:
        """Run on_abort or on_close; errors are logged, nothing is answered."""
        self.wait_pending(session)
        try:
            session._pmk_stage = stage
            result = self.method(stage)(session)
            if stage in self.asynchronous:
                ok, value = self.run_coroutine(self.bounded(result, stage))
                if not ok:
                    if isinstance(value, Expired):
                        self.timed_out(stage, value.elapsed, "cancelled", session)
                    else:
                        self.fail(value, stage, session)
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc, stage, session)
        finally:
            session._pmk_stage = None


class _Modifications(BackendWrapper):
    """A fail-open run's backend: notes that the session sent a modification (for
    `SessionRules.whole_or_nothing`)."""

    __slots__ = ("session",)

    def __init__(self, inner: SessionBackend, session: MilterSession) -> None:
        super().__init__(inner)
        self.session = session

    def act(self, action: ActionInfo, *args: Any) -> None:
        if action.flag:  # a change to the message (not progress nor a reply)
            self.session._pmk_modified = True
        self.perform(action, *args)


def _noting_modifications(
    callback: Callable[..., int], sessions: Mapping[Any, MilterSession]
) -> Callable[..., int]:
    """on_eom's callback in a fail-open run: each end of message starts with no modification
    sent."""

    def eom(key: Any, a: Any = None, b: Any = None) -> int:
        session = sessions.get(key)
        if session is not None:
            session._pmk_modified = False
        return callback(key, a, b)

    return eom


class Expired:
    """An async stage's outcome when it ran past its deadline and was cancelled."""

    __slots__ = ("elapsed",)

    def __init__(self, elapsed: float) -> None:
        self.elapsed = elapsed
