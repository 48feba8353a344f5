"""The C-callback adapter: libmilter's callbacks into the rule set (`_dispatch.SessionRules`).

Theory of operation
-------------------
libmilter calls back on its own worker threads, one callback at a time per connection, and a
connection's callbacks may hop between threads; so no state is kept per thread. Sessions are
kept in a dict keyed by the SMFICTX address, which libmilter keeps for the whole connection
(and reuses only after xxfi_close, where the session is dropped). A session is created at the
connection's first callback (normally negotiate), and again at connect after QUIT_NC.

Every trampoline catches BaseException: a Python exception must never reach C (ctypes would
hand libmilter a garbage status). Exceptions are logged with the stage and answered with the
runner's error status; KeyboardInterrupt/SystemExit also ask the runner to stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, NoReturn

from . import _libmilter as c
from . import _libmilter_private as private
from . import _metrics
from ._dispatch import NO_PARAMS, Entry, Expired, SessionRules, entries, keys_inside
from ._dryrun import DryRun
from ._errors import LibmilterError
from ._flags import Status
from ._loop import EventLoopThread
from ._protocol import (
    ACTION,
    BY_METHOD,
    STAGES,
    ActionBackend,
    ActionInfo,
    BackendWrapper,
    SessionBackend,
)
from ._record import Recorder, RecordOptions
from ._session import ABANDONED, MilterSession
from ._threadstate import pin_thread_state
from ._types import EsmtpParams, decode

__all__ = ["CtxBackend", "LibmilterCallbacks", "SyncEomProgress", "Watchman"]

logger = logging.getLogger("pymilterkit")
_CLOSE_WAIT = 5.0  # s: libmilter's close waits this long for a stop closing its session
_ABANDON_AFTER = 0.1  # s past its deadline: a cancelled async stage still running is abandoned
_ANSWER_HERE = 0.001  # s a suspended stage's callback waits for its answer before returning
_NOREPLY = Status.NOREPLY
_perf_counter = time.perf_counter
_COMPACT = 1024  # a deadline queue this long (and each multiple) drops its answered stages

class CtxBackend(ActionBackend):
    """Session actions as smfi_* calls on one libmilter context: each action is its table
    row's libmilter function called with the context and the action's arguments."""

    __slots__ = ("ctx", "guard", "lib", "macros")

    def __init__(self, lib: c.Libmilter, ctx: int) -> None:
        self.lib = lib
        self.ctx = ctx
        self.macros: dict[bytes, bytes | None] | None = None
        """A copy of the context's macros while an async stage waits for its answer."""
        self.guard: threading.Lock | None = None
        """While an async stage is suspended: held by a read of the context's own macros, and
        by `_defer` to replace them with the copy (libmilter's thread then reads on)."""

    @staticmethod
    def _refused(function: str) -> NoReturn:
        raise LibmilterError(
            f"libmilter refused {function} (MI_FAILURE): the MTA connection may be gone, "
            f"or the action was not negotiated"
        )

    def act(self, action: ActionInfo, *args: Any) -> None:
        if getattr(self.lib, action.function)(self.ctx, *args) != c.MI_SUCCESS:
            self._refused(action.function)

    def getsymval(self, name: bytes) -> bytes | None:
        guard = self.guard  # set (by `_Pending`) before `macros`, cleared after it
        if guard is None:
            return private.ctx_macro(self.lib, self.ctx, name)  # not smfi_getsymval: it can crash
        with guard:  # read by a suspended stage: libmilter's thread is not to read on meanwhile
            if self.macros is not None:  # it does now, and may free the context's macros
                return _copied(self.macros, name)
            return private.ctx_macro(self.lib, self.ctx, name)

    def add_header(self, name: bytes, value: bytes) -> None:
        if self.lib.smfi_addheader(self.ctx, name, value) != c.MI_SUCCESS:  # inline: the
            self._refused("smfi_addheader")  # action of most messages

    def delete_header(self, name: bytes, index: int) -> None:
        self.act(ACTION["delete_header"], name, index, None)  # smfi_chgheader with NULL

    def replace_body(self, chunk: bytes) -> None:
        # smfi_replacebody takes an int length: hand over large bodies in pieces.
        step = 1 << 30
        for start in range(0, max(len(chunk), 1), step):
            piece = chunk[start : start + step]
            self.act(ACTION["replace_body"], piece, len(piece))

    def set_reply(self, code: bytes, xcode: bytes | None, lines: Sequence[bytes]) -> None:
        if len(lines) <= 1:
            self.act(ACTION["set_reply"], code, xcode, lines[0] if lines else None)
        elif c.setmlreply(self.ctx, code, xcode, list(lines)) != c.MI_SUCCESS:
            self._refused("smfi_setmlreply")


class LibmilterCallbacks(SessionRules):
    """Owns the live sessions of one runner and builds libmilter's callback table."""

    def __init__(
        self,
        session_class: type[MilterSession],
        lib: c.Libmilter,
        error_status: Status,
        on_fatal: Callable[[BaseException], None],
        tcp: bool = False,
        *,
        loop: EventLoopThread | None = None,
        deadlines: Mapping[str, float | None] | None = None,
        timeout_status: Status = Status.TEMPFAIL,
        progress_interval: float | None = None,
        metrics: bool = False,
        dry_run: bool = False,
        record: RecordOptions | None = None,
    ) -> None:
        super().__init__(
            session_class,
            error_status,
            tcp=tcp,
            deadlines=deadlines,
            timeout_status=timeout_status,
            meter=_metrics.meter() if metrics else None,
            dry_run=DryRun() if dry_run else None,
            recorder=None if record is None else Recorder(record, session_class),
        )
        self.lib = lib
        self.on_fatal = on_fatal
        self._loop: EventLoopThread | None = None
        self.loop = loop
        self.progress_interval = progress_interval
        self._answer_later: bool | None = None  # whether replies can be sent later (layout)
        self.deadline_queue = _Deadlines()  # of suspended async stages (the loop's)
        self._handover = threading.Lock()  # who answers a suspended stage (`_defer`, `_finish`)
        self.sessions: dict[int, MilterSession] = {}
        self.active: dict[int, str] = {}
        """Running negotiate/abort/close callbacks (stage callbacks: `_dispatch.keys_inside`)."""
        self.stopping = False
        """Set when a stop begins: no session is created after it."""
        self._closing: dict[int, threading.Event] = {}  # contexts close_all is closing
        self.session_limit: int | None = None
        self.past_limit: threading.Event | None = None
        """Set once `session_limit` sessions were created (a worker then retires)."""

    def fatal(self, exc: BaseException, stage: str) -> None:
        super().fatal(exc, stage)
        self.on_fatal(exc)

    stage_macros = staticmethod(private.stage_macros)  # called as it is: one call less

    @property
    def loop(self) -> EventLoopThread | None:
        """The event loop of `async def` stages (None: the class has none)."""
        return self._loop

    @loop.setter
    def loop(self, loop: EventLoopThread | None) -> None:
        self._loop = loop
        if loop is not None:
            loop.on_restart = functools.partial(_metrics.event_loop, True)
            loop.on_down = functools.partial(_metrics.event_loop, False)

    # -- trampolines -----------------------------------------------------------------------

    def _create(self, ctx: int) -> MilterSession | None:
        if self.stopping:
            return None
        session = self.create(CtxBackend(self.lib, ctx))
        self.sessions[ctx] = session
        if self.session_limit is not None and self.created >= self.session_limit:
            assert self.past_limit is not None
            self.past_limit.set()
        return session

    def _stage(
        self, stage: str, convert: Callable[..., tuple[Any, ...]] | None
    ) -> Callable[..., int]:
        """The callback of one reply-giving stage: the shared `stage_callback`, keyed by ctx."""
        callback = self.stage_callback(
            stage,
            self.sessions,
            self._create,
            convert,
            envelope=convert is _envelope,
            pin=pin_thread_state,
        )
        if convert is _unknown:  # the only conversion that needs the context: hand it on
            return lambda ctx, cmd: callback(ctx, ctx, cmd)
        return callback

    # -- async def stages --------------------------------------------------------------------
    #
    # An async stage's coroutine takes its first step at once, on libmilter's thread
    # (`EventLoopThread.start`): one that finishes without suspending is answered like a sync
    # stage, with no thread crossed. One that suspends goes on as a task of the event loop and,
    # where it can (`_can_defer`), the callback returns NOREPLY at once: libmilter sends nothing
    # and parks the session, so its worker thread serves other connections while the coroutine
    # waits; the loop sends the answer when the coroutine is done (`send_reply`). Until then
    # the session's `_pmk_pending` is set: a callback for the same connection (a peer that did
    # not wait for the answer, a close) waits for it first, so one connection's calls never
    # overlap, and the context stays valid (libmilter frees it only after xxfi_close returns).

    def run_coroutine(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run `coro` (its first step here) on the event loop; this thread waits for it."""
        assert self.loop is not None
        return self.loop.run(coro)

    def _can_defer(self, ctx: int, stage: str) -> bool:
        answer_later = self._answer_later
        if answer_later is None:
            answer_later = self._answer_later = private.can_answer_later(ctx)
        if not answer_later:
            return False  # another libmilter build: the worker waits for the coroutine
        # A body chunk carried by the end-of-message packet: libmilter calls eom right after
        # on_body returns CONTINUE, so that answer cannot wait.
        return stage != "on_body" or private.ctx_state(ctx) != private.ST_ENDM

    def answer_async(
        self, key: Any, session: MilterSession, stage: str, coro: Coroutine[Any, Any, Any]
    ) -> int:
        loop = self._loop
        assert loop is not None
        start = _perf_counter()
        suspended: list[_Pending] = []  # by `_suspended`, if the stage did not end at once
        answering = self._answer(key, session, stage, coro, start, suspended)
        try:
            task = loop.start(
                answering, self._suspended, key, session, stage, start, suspended, keep_hooks=True
            )
        except BaseException as exc:  # noqa: BLE001 - the loop has stopped: nothing may reach C
            coro.close()
            session._pmk_stage = None
            if not loop.alive:  # not a silent TEMPFAIL factory: counted, /healthz fails
                logger.critical("the event loop is down: async stages cannot be served")
                _metrics.event_loop(False)
            return self.answered(stage, self.fail(exc, stage, session), session, 0.0)
        if not suspended:  # done in its first step (or its wait was over: `_loop._drain`)
            try:
                return task.result()  # type: ignore[return-value]  # (an int, not suspended)
            except BaseException as exc:  # noqa: BLE001 - the stage cancelled its own task
                return self.fail(exc, stage, session)
        pending = suspended[0]
        # Waiting here a little is cheaper than answering from the loop: libmilter's thread
        # writes the answer and reads on, where a later answer costs a write from the loop
        # and libmilter parks and wakes the session. Past that, the loop answers (if it can).
        if pending.deferrable and not pending.wait(_ANSWER_HERE) and self._defer(pending):
            return Status.NOREPLY  # the loop answers when it is done (`_answer`)
        pending.wait()  # answered meanwhile, or it cannot be sent later
        if pending.answer is None:  # `_answer` failed (the filter's errors are settled in it),
            # or the stage was abandoned at a hang-up and its task still runs
            failure = task.exception() if task.done() and not task.cancelled() else None
            return self.fail(failure or RuntimeError("the stage was not answered"), stage)
        return pending.answer

    def _suspended(
        self,
        task: asyncio.Task[Any],
        ctx: int,
        session: MilterSession,
        stage: str,
        start: float,
        suspended: list[_Pending],
    ) -> None:
        """The stage's coroutine suspended in its first step (libmilter's thread, the loop
        kept out): it goes on on the loop as `task`."""
        suspended.append(_Pending(self, ctx, session, stage, start, task))

    def _defer(self, pending: _Pending) -> bool:
        """`pending` was not answered at once: the loop is to send its answer (True), unless it
        came meanwhile (False). libmilter's thread then reads on and frees macro packets as new
        ones come: the stage reads a copy of them from now on."""
        backend = pending.macros
        copy = None if backend is None else private.ctx_macros(pending.ctx)
        with self._handover:  # no read of the context's macros is under way (`guard`)
            if pending.settled:
                return False
            pending.inline = False
            if backend is not None:
                backend.macros = copy
        return True

    async def _answer(
        self,
        ctx: int,
        session: MilterSession,
        stage: str,
        coro: Coroutine[Any, Any, Any],
        start: float,
        suspended: list[_Pending],
    ) -> int | None:
        """Run the stage. Not suspended (`suspended` empty: the callback is still in `start`):
        its answer is the result. Else it goes to `pending.answer` while the callback waits
        for it (`pending.inline`), else to the MTA."""
        try:
            value = await coro
        except BaseException as exc:  # noqa: BLE001 - the error policy decides
            outcome: tuple[bool, Any] = (False, exc)
        else:
            if (
                not suspended
                and value.__class__ is Status
                and value is not _NOREPLY
                and stage in self.as_returned
            ):  # the common case, answered as the sync callback's tail would answer it
                session._pmk_stage = None
                return value
            outcome = (True, value)
        if not suspended:
            settled = self.settle(session, stage, outcome)
            return self.answered(stage, settled, session, _perf_counter() - start)
        pending = suspended[0]
        if pending.expired:  # its deadline cancelled it (or it caught that and returned)
            outcome = (False, Expired(_perf_counter() - start))
        if pending.abandoned:  # answered at its deadline (`_abandon`)
            ABANDONED.discard(pending.task)
            logger.info("%s.%s: the abandoned stage ended", self.session_class.__qualname__, stage)
            return None
        answer = None
        try:
            if pending.closing:  # the MTA hung up: nothing to answer
                session._pmk_stage = None
                logger.info(
                    "%s.%s: the connection closed while it ran; cancelled",
                    self.session_class.__qualname__,
                    stage,
                )
            else:
                answer = self.settle(session, stage, outcome)
                answer = self.answered(stage, answer, session, _perf_counter() - start)
        finally:
            self._finish(pending, answer)
        return None

    def _finish(self, pending: _Pending, answer: int | None) -> None:
        """Send `answer` of `pending`'s stage (None: none) and end it (the loop's thread)."""
        pending.due = None  # its deadline's queue drops it (`_Deadlines`)
        for timer in (pending.ticker, pending.expiry):
            if timer is not None:
                timer.cancel()
        try:
            with self._handover:  # against `_defer`: answered here, or sent from the loop
                pending.settled = True
                inline = pending.inline
                if inline:
                    pending.answer = answer
            if answer is None or inline:
                pass
            elif pending.stage not in self.noreply and not private.send_reply(pending.ctx, answer):
                logger.warning("could not send the answer of %s to the MTA", pending.stage)
                private.hang_up(pending.ctx)
        finally:
            if pending.macros is not None:
                pending.macros.macros = None  # answered: libmilter's thread may go on
                pending.macros.guard = None
            if pending.session._pmk_pending is pending:
                pending.session._pmk_pending = None
            pending.set()

    def _abandon(self, pending: _Pending) -> None:
        """`pending`'s stage did not end when cancelled at its deadline (or when its connection
        closed): answer it now (closed: end it, so the close goes on) and leave its task to
        itself; its later session calls raise (the loop's thread)."""
        if pending.answered:
            return
        pending.abandoned = True
        ABANDONED.add(pending.task)
        session, stage = pending.session, pending.stage
        elapsed = time.perf_counter() - pending.start
        session._pmk_stage = None
        if pending.closing:  # nothing to answer: on_close waits for this
            logger.warning(
                "%s.%s: the connection closed while it ran, and it did not stop when "
                "cancelled: abandoned after %.3f s",
                self.session_class.__qualname__, stage, elapsed,
                extra={"pmk_session": session, "pmk_stage": stage},
            )
            self._finish(pending, None)
            return
        what = f"it did not stop when cancelled: answering {self.timeout_status.name}, abandoned"
        self.timed_out(stage, elapsed, what, session)
        answer = Status.NOREPLY if stage in self.noreply else self.whole_or_nothing(
            session, stage, self.timeout_status)
        self._finish(pending, self.answered(stage, answer, session, elapsed))

    def end_pending(self, grace: float) -> int:
        """Before libmilter stops: let pending async stages finish for up to `grace` seconds,
        then cancel the rest and detach them; returns how many were cancelled.

        At its stop libmilter frees every context; an answer or action sent after that would
        use freed memory, so none is sent once this returns.
        """
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._pending_sessions():
            time.sleep(0.01)
        left = self._pending_sessions()
        for session in left:
            self._cancel_pending(session)
            session._pmk_backend = _DETACHED  # the coroutine's later actions raise
        deadline = time.monotonic() + 1.0
        for session in left:
            pending = session._pmk_pending
            if pending is not None:
                pending.wait(max(0.0, deadline - time.monotonic()))
        return len(left)

    def _pending_sessions(self) -> list[MilterSession]:
        return [s for s in list(self.sessions.values()) if s._pmk_pending is not None]

    def _cancel_pending(self, session: MilterSession) -> None:
        """The connection is closing: cancel its running async stage (close waits for it)."""
        pending = session._pmk_pending
        if pending is not None and self.loop is not None:
            pending.closing = True
            self.loop.call(pending.hang_up)

    def in_flight(self) -> bool:
        """Whether a callback is running (a stop waits for it before closing sessions)."""
        if self.active:
            return True
        in_stage = self.in_stage
        return any(in_stage(s) is not None for s in list(self.sessions.values()))

    @contextlib.contextmanager
    def _running(self, ctx: int, stage: str) -> Iterator[None]:
        """Mark a negotiate/abort/close callback as running, as the stage callbacks mark
        themselves, so a stop waits for it to finish."""
        pin_thread_state()
        self.active[ctx] = stage
        try:
            yield
        finally:
            del self.active[ctx]

    def _negotiate(
        self, ctx: int, f0: int, f1: int, f2: int, f3: int, pf0: Any, pf1: Any, pf2: Any, pf3: Any
    ) -> int:
        with self._running(ctx, "on_negotiate"):
            try:
                session = self._create(ctx)
            except BaseException as exc:  # noqa: BLE001
                self.fail(exc, "on_negotiate")
                return Status.TEMPFAIL
            if session is None:  # stopping: refuse the connection
                return Status.TEMPFAIL
            lib = self.lib
            status, actions, opts = self.negotiate(
                session, f0, f1, lambda where, names: lib.smfi_setsymlist(ctx, where, names)
            )
            if status == Status.CONTINUE:
                c.write_negotiation(pf0, pf1, pf2, pf3, actions, opts)
            return status

    def _abort(self, ctx: int) -> int:
        with self._running(ctx, "on_abort"):  # before the look-up: a stop sees it (close_all)
            session = self.sessions.get(ctx)
            if session is not None:
                self.abort(session)
        return Status.CONTINUE

    def _close(self, ctx: int) -> int:
        session = self.sessions.pop(ctx, None)
        if session is not None:
            self._cancel_pending(session)
            with self._running(ctx, "on_close"):
                self.close(session)
        else:  # a stop took it (close_all): libmilter frees the context once this returns
            closing = self._closing.get(ctx)
            if closing is not None:
                closing.wait(_CLOSE_WAIT)
        return Status.CONTINUE

    def close_all(self, grace: float = 0.0) -> int:
        """Run on_close for sessions libmilter abandoned (at stop); returns how many.

        A session whose stage (or negotiate/abort/close) is still running is closed once it
        returned, waiting up to `grace` seconds: its calls never overlap and on_close is the
        last. One still running then is logged, and the process ends around it.

        Each session is first taken out of `sessions`, so a callback that starts later finds
        none (and, stopping, makes none: TEMPFAIL); only then is it checked for a callback
        already inside it: a thread in a stage callback of its context (`keys_inside`: every
        stage callback marks its thread before its look-up), `active` (negotiate, abort, close),
        or its stage mark (an async stage still running after its callback returned).
        With dry-run, what was not sent is logged at the end.
        """
        self.stopping = True
        count = 0
        deadline = time.monotonic() + grace
        held: dict[int, MilterSession] = {}  # out of `sessions`, not closed yet
        closing = self._closing
        try:
            while True:
                for ctx in list(self.sessions):
                    if ctx in held:
                        continue
                    closing[ctx] = threading.Event()  # before the pop: see `_close`
                    session = self.sessions.pop(ctx, None)
                    if session is None:  # libmilter's close took it
                        closing.pop(ctx).set()
                    else:
                        held[ctx] = session
                inside = keys_inside()
                for ctx, session in list(held.items()):
                    if ctx in inside or ctx in self.active or self.in_stage(session) is not None:
                        continue
                    del held[ctx]
                    count += 1
                    try:
                        self.abort(session)
                        self.close(session)
                    finally:
                        closing.pop(ctx).set()
                if not held and not self.sessions and not self.active:
                    break
                if time.monotonic() >= deadline:
                    for ctx, session in held.items():
                        running = self.in_stage(session) or self.active.get(ctx) or "a callback"
                        logger.warning(
                            "a session is still in %s at stop: not closed",
                            running,
                            extra={"pmk_session": session},
                        )
                    for ctx, stage in list(self.active.items()):
                        if ctx not in held:
                            logger.warning("%s still running at stop", stage)
                    self.sessions.clear()
                    break
                time.sleep(0.005)  # also lets a stage that just returned finish its callback
        finally:
            for event in closing.values():
                event.set()
            closing.clear()
            if self.dry_run is not None:
                self.dry_run.summary()
            if self.recorder is not None:
                self.recorder.stop()
        return count

    def descriptor(self, name: bytes) -> c.SmfiDesc:
        """The smfiDesc with a callback for each overridden stage, plus negotiate and close."""
        stages = self.spec.stages
        make = c.Callbacks.make
        desc = c.SmfiDesc()
        desc.xxfi_name = name
        desc.xxfi_version = c.SMFI_VERSION
        desc.xxfi_flags = int(self.spec.actions)

        # Per stage: the conversion of libmilter's arguments to the method's; the callback's
        # field and C type come from the stage table.
        convert: dict[str, Callable[..., tuple[Any, ...]] | None] = {
            "on_connect": lambda host, addr: (decode(host or b""), c.sockaddr_to_address(addr)),
            "on_helo": lambda host, _: (decode(host or b""),),
            "on_mail": _envelope,
            "on_rcpt": _envelope,
            "on_data": None,
            "on_unknown": _unknown,
            "on_header": lambda n, v: (decode(n or b""), decode(v or b"")),
            "on_eoh": None,
            "on_body": lambda p, n: (c.body_bytes(p, n),),
            "on_eom": None,
        }
        assert set(convert) == set(BY_METHOD)
        for info in STAGES:
            if info.method in stages:
                callback = self._stage(info.method, convert[info.method])
                setattr(desc, info.callback, make(info.shape, callback))
        if self.answer_data:  # TCP without on_data: see SessionRules.__init__
            desc.xxfi_data = make("ctx", _continue)
        desc.xxfi_negotiate = make("negotiate", self._negotiate)
        desc.xxfi_close = make("ctx", self._close)
        if "on_abort" in stages:
            desc.xxfi_abort = make("ctx", self._abort)
        return desc


class _Guarded(BackendWrapper):
    """A session's backend whose actions hold a lock, so progress can be sent between them."""

    __slots__ = ("lock",)

    def __init__(self, inner: SessionBackend) -> None:
        super().__init__(inner)
        self.lock = threading.Lock()

    def act(self, action: ActionInfo, *args: Any) -> None:
        with self.lock:
            self.perform(action, *args)

    def send_progress(self) -> None:
        with self.lock:
            self.inner.progress()


class SyncEomProgress:
    """Sends progress for on_eom methods that run longer than `interval` seconds on libmilter's
    thread: a sync one, or an `async def` one before its first suspension (then `_Progress`
    of its `_Pending` takes over on the loop).

    A thread looks at the sessions every `period` seconds: one it finds in on_eom gets a
    backend whose actions hold a lock (`_Guarded`), and once it has been seen in on_eom for
    `interval`, progress is sent under that lock, so it never interleaves with the filter's
    own actions on the socket. An action that began before the swap is a write of at most
    64 KiB, long done by the first progress `interval` later. Nothing is added to the
    callbacks: a fast on_eom never meets the thread, and a session seen out of on_eom gets its
    plain backend back (a long connection would otherwise pay the lock on every later action).
    """

    def __init__(self, callbacks: LibmilterCallbacks, interval: float) -> None:
        self.callbacks = callbacks
        self.interval = interval
        self.period = min(1.0, interval / 4)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pymilterkit-progress", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2.0)

    def _run(self) -> None:
        seen: dict[int, tuple[MilterSession, float, float]] = {}
        while not self.stopped.wait(self.period):
            now = time.monotonic()
            current: dict[int, tuple[MilterSession, float, float]] = {}
            for ctx, session in list(self.callbacks.sessions.items()):
                backend = session._pmk_backend
                if session._pmk_stage != "on_eom" or session._pmk_pending is not None:
                    if isinstance(backend, _Guarded):  # out of on_eom: the plain backend again
                        session._pmk_backend = backend.inner
                    continue
                entry = seen.get(ctx)
                if entry is None or entry[0] is not session:
                    if backend is not None and not isinstance(backend, _Guarded):
                        session._pmk_backend = _Guarded(backend)
                    entry = (session, now, now)
                elif now - entry[2] >= self.interval and isinstance(backend, _Guarded):
                    try:
                        backend.send_progress()
                    except Exception:  # the MTA may be gone; its close follows
                        logger.debug("could not send progress", exc_info=True)
                    entry = (session, entry[1], now)
                current[ctx] = entry
            seen = current


class _Detached(ActionBackend):
    """The backend of a session whose connection is gone: every action raises."""

    __slots__ = ()

    def act(self, action: ActionInfo, *args: Any) -> None:
        raise LibmilterError(f"{action.label}: the milter is stopping; the connection is gone")

    def getsymval(self, name: bytes) -> bytes | None:
        raise LibmilterError("macro: the milter is stopping; the connection is gone")


_DETACHED: Any = _Detached()


def _ctx_backend(session: MilterSession) -> CtxBackend | None:
    """The libmilter backend under `session`'s wrappers (None: detached)."""
    backend: Any = session._pmk_backend
    while isinstance(backend, BackendWrapper):
        backend = backend.inner
    return backend if isinstance(backend, CtxBackend) else None


class _Pending:
    """An async stage that suspended in its first step: its task, its answer, and a latch
    released when it has been answered (others wait for it: `SessionRules.wait_pending`)."""

    answer: int | None = None
    inline = True  # the callback waits for the answer (it has not returned)
    settled = False  # `_finish` has taken its answer (then `_defer` cannot)
    closing = False
    answered = False
    ticker: _Progress | None = None
    due: float | None = None  # loop time of its deadline while queued (`_Deadlines`)
    expiry: asyncio.TimerHandle | None = None  # past the deadline: `_abandon`
    expired = abandoned = False
    macros: CtxBackend | None = None  # whose macros reads are guarded, then copied

    def __init__(
        self,
        callbacks: LibmilterCallbacks,
        ctx: int,
        session: MilterSession,
        stage: str,
        start: float,
        task: asyncio.Task[Any],
    ) -> None:
        """On libmilter's thread, the loop kept out: the stage goes on on the loop, with its
        deadline and progress ticker armed now (`_answer` answers it)."""
        self.callbacks, self.ctx, self.session, self.stage = callbacks, ctx, session, stage
        self.start, self.task = start, task  # (perf_counter() at the stage's start)
        # Held until answered: a plain lock, which a waiter takes and gives back (a
        # threading.Event is a Condition of Python objects: made and set at every suspension,
        # it cost more than the rest of the hand-off's bookkeeping).
        self.latch = threading.Lock()
        self.latch.acquire()
        session._pmk_pending = self
        limit = callbacks.deadlines.get(stage)
        if limit is not None:  # armed only now: a stage done in its first step needs no timer
            callbacks.deadline_queue.add(self, limit)
        if stage == "on_eom" and callbacks.progress_interval:
            self.ticker = _Progress(session, callbacks.progress_interval)
        self.deferrable = callbacks._can_defer(ctx, stage)
        """Whether its answer may be sent after the callback returned."""
        if self.deferrable:  # its reads of the macros from now on are guarded (`_defer`)
            self.macros = _ctx_backend(session)
            if self.macros is not None:
                self.macros.guard = callbacks._handover

    def expire(self) -> None:
        """Its deadline passed: cancel the stage's task, abandon it if it goes on (loop)."""
        self.expired = True
        self.hang_up()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the stage has been answered; whether it was."""
        if self.answered:
            return True
        if not self.latch.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self.latch.release()  # for the next waiter
        return True

    def set(self) -> None:
        """It has been answered: every waiter goes on (once)."""
        if not self.answered:
            self.answered = True
            self.latch.release()

    def hang_up(self) -> None:
        """The connection is closing (or, by `expire`, the deadline passed): cancel the stage's
        task, and abandon it if it goes on (on the loop's thread), so nothing waits for it."""
        self.task.cancel()
        if self.expiry is None:
            self.expiry = asyncio.get_running_loop().call_later(
                _ABANDON_AFTER, self.callbacks._abandon, self)


class _Deadlines:
    """The deadlines of suspended async stages, with one loop timer at the earliest.

    One queue per limit: a stage's limit is the same at each suspension, so each queue is in
    the order its stages are due (give or take how long their first steps took, which may
    delay a deadline behind a later one by as much). Adding is an append; an answered stage
    only clears its `due` and leaves its queue when it reaches the head or the queue is
    compacted. A timer per suspension (heap push, cancel, pop) cost more.
    """

    __slots__ = ("queues", "timer", "when")

    def __init__(self) -> None:
        self.queues: dict[float, collections.deque[_Pending]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.when = float("inf")  # of `timer`

    def add(self, pending: _Pending, limit: float) -> None:
        """Queue `pending`'s deadline (on the loop, or with it kept out)."""
        loop = asyncio.get_running_loop()
        due = pending.due = loop.time() + limit - (time.perf_counter() - pending.start)
        queue = self.queues.get(limit)
        if queue is None:
            queue = self.queues[limit] = collections.deque()
        while queue and queue[0].due is None:
            queue.popleft()
        if len(queue) >= _COMPACT and len(queue) & (_COMPACT - 1) == 0:
            live = [p for p in queue if p.due is not None]
            queue.clear()
            queue.extend(live)
        queue.append(pending)
        if due < self.when:
            self._arm(loop, due)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.when = when
        self.timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        """Expire what is due, then wait for the next (the loop's thread)."""
        loop = asyncio.get_running_loop()
        self.timer, self.when = None, float("inf")
        now = loop.time()
        earliest = float("inf")
        for queue in self.queues.values():
            while queue:
                head = queue[0]
                due = head.due
                if due is not None and due > now:
                    earliest = min(earliest, due)
                    break
                queue.popleft()
                if due is not None:
                    head.due = None
                    head.expire()
        if earliest != float("inf"):
            self._arm(loop, earliest)


class _Progress:
    """Sends SMFIR_PROGRESS every `interval` seconds while an async on_eom runs (loop thread),
    through the session's backend (metrics count it)."""

    def __init__(self, session: MilterSession, interval: float) -> None:
        self.session, self.interval = session, interval
        self.handle = asyncio.get_running_loop().call_later(interval, self.tick)

    def tick(self) -> None:
        backend = self.session._pmk_backend
        if backend is not None:
            try:
                backend.progress()
            except Exception:  # the MTA may be gone; its close follows
                logger.debug("could not send progress", exc_info=True)
        self.handle = asyncio.get_running_loop().call_later(self.interval, self.tick)

    def cancel(self) -> None:
        self.handle.cancel()


def _unknown(ctx: int, cmd: int | None) -> tuple[str]:
    """xxfi_unknown's command: only its packet's bytes (libmilter does not check the NUL)."""
    return (decode(private.unknown_command(ctx, cmd)),)


def _continue(ctx: int) -> int:
    return Status.CONTINUE




def _envelope(argv: Any) -> tuple[str, EsmtpParams]:
    """envfrom/envrcpt's NULL-terminated argv: the address and its ESMTP parameters."""
    first = argv[0] if argv else None
    if first is None:
        return "", NO_PARAMS
    params = []
    index = 1
    while (item := argv[index]) is not None:  # libmilter ends the array with NULL
        params.append(item.decode("utf-8", "surrogateescape"))
        index += 1
    address = first.decode("utf-8", "surrogateescape")
    return address, EsmtpParams(params) if params else NO_PARAMS


class _Seen:
    """A session as the watchman logs it: its id, macros from a copy (or none)."""

    __slots__ = ("_pmk_backend", "_pmk_id", "_pmk_stage")

    def __init__(self, session: MilterSession, macros: dict[bytes, bytes | None] | None) -> None:
        self._pmk_id, self._pmk_stage = session._pmk_id, None
        self._pmk_backend = None if macros is None else _Copied(macros)


class _Copied:
    __slots__ = ("macros",)

    def __init__(self, macros: dict[bytes, bytes | None]) -> None:
        self.macros = macros

    def getsymval(self, name: bytes) -> bytes | None:
        return _copied(self.macros, name)


def _copied(macros: dict[bytes, bytes | None], name: bytes) -> bytes | None:
    """Macro `name` from a copy made by `_libmilter_private.ctx_macros`."""
    return macros.get(private.macro_key(name)) if name else None


class Watchman:
    """Reports stages still running at their deadline, when it passes (a thread of its own).

    A sync stage (or an async one's first step, on libmilter's thread) cannot be cancelled:
    the watchman looks at every thread's `Entry` each `period`, times each call from when it
    first saw it (nothing is added to the callbacks), and logs and counts one whose deadline
    passed. To log its queue id and client it reads the connection's macros while holding
    `Entry.watched`, which the callback waits for before it returns to libmilter (which would
    free them). A suspended async stage is cancelled on the loop at its deadline; when the
    loop's turn began before that deadline and still runs, something blocks the loop (a
    blocking call in an async stage): logged the same way, with the stage's copied macros.
    """

    def __init__(self, callbacks: LibmilterCallbacks) -> None:
        self.callbacks = callbacks
        limits = [limit for limit in callbacks.deadlines.values() if limit]
        self.period = min(1.0, max(0.02, min(limits) / 10)) if limits else 1.0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pymilterkit-deadlines", daemon=True)
        if limits:
            self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(2.0)

    def _run(self) -> None:
        calls: dict[int, list[Any]] = {}  # id(entry) -> [its call's key, first seen, reported]
        seen: set[tuple[int, float]] = set()  # pendings reported: (id, start)
        while not self.stopped.wait(self.period):
            try:
                calls = self._calls(calls, time.perf_counter())
                seen = self._pending(seen, time.perf_counter())
            except Exception:  # never let the watch end
                logger.exception("the deadline watch failed")

    def _calls(self, calls: dict[int, list[Any]], now: float) -> dict[int, list[Any]]:
        deadlines, sessions, still = self.callbacks.deadlines, self.callbacks.sessions, {}
        for entry in entries():
            key = entry.key
            if key is None:
                continue
            call = calls.get(id(entry))
            if call is None or call[0] is not key:
                call = [key, now, False]  # a call not seen before
            still[id(entry)] = call
            session = sessions.get(key)
            if call[2] or session is None or session._pmk_pending is not None:  # async: below
                continue
            stage = session._pmk_stage
            limit = None if stage is None else deadlines.get(stage)
            if stage is not None and limit is not None and now - call[1] >= limit:
                call[2] = self._report(entry, key, session, stage, now - call[1])
        return still

    def _pending(self, seen: set[tuple[int, float]], now: float) -> set[tuple[int, float]]:
        callbacks, still = self.callbacks, set[tuple[int, float]]()
        loop = callbacks.loop
        busy = None if loop is None else loop.selector.pmk_busy
        if busy is None or now - busy < _ABANDON_AFTER:  # waiting, or a turn too short to block
            return still
        for session in list(callbacks.sessions.values()):
            pending = session._pmk_pending
            limit = None if pending is None else callbacks.deadlines.get(pending.stage)
            if pending is None or limit is None or not busy <= pending.start + limit <= now:
                continue  # the loop's turn began after the deadline, or it is not due
            mark = (id(pending), pending.start)
            if mark not in seen:
                copy = pending.macros.macros if pending.macros is not None else None
                callbacks.timed_out(
                    pending.stage, now - pending.start,
                    "the event loop is blocked (a blocking call in an async stage?)",
                    _Seen(session, copy),
                )
            still.add(mark)
        return still

    def _report(
        self, entry: Entry, key: Any, session: MilterSession, stage: str, elapsed: float
    ) -> bool:
        watched = threading.Lock()
        watched.acquire()
        entry.watched = watched  # then the key, in this order: see `Entry`
        try:
            if entry.key is not key:
                return False  # it returned
            what = "it blocks (a sync stage, or a blocking call in an async one's first step) " \
                "and cannot be cancelled"
            self.callbacks.timed_out(stage, elapsed, what, session)
            return True
        finally:
            entry.watched = None
            watched.release()
