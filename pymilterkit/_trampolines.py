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

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from . import _libmilter as c
from ._dispatch import NO_PARAMS, SessionRules
from ._errors import LibmilterError
from ._flags import Status
from ._protocol import BY_METHOD
from ._session import MilterSession
from ._threadstate import pin_thread_state, pins
from ._types import EsmtpParams, decode

__all__ = ["CtxBackend", "LibmilterCallbacks"]

logger = logging.getLogger("pymilterkit")

class CtxBackend:
    """Session actions as smfi_* calls on one libmilter context."""

    __slots__ = ("ctx", "lib")

    def __init__(self, lib: c.Libmilter, ctx: int) -> None:
        self.lib = lib
        self.ctx = ctx

    @classmethod
    def _check(cls, result: int, function: str) -> None:
        if result != c.MI_SUCCESS:
            cls._refused(function)

    @staticmethod
    def _refused(function: str) -> NoReturn:
        raise LibmilterError(
            f"libmilter refused {function} (MI_FAILURE): the MTA connection may be gone, "
            f"or the action was not negotiated"
        )

    def getsymval(self, name: bytes) -> bytes | None:
        return c.ctx_macro(self.lib, self.ctx, name)  # not smfi_getsymval: it can crash

    def setreply(self, code: bytes, xcode: bytes | None, lines: Any) -> None:
        if len(lines) <= 1:
            self._check(
                self.lib.smfi_setreply(self.ctx, code, xcode, lines[0] if lines else None),
                "smfi_setreply",
            )
        else:
            self._check(c.setmlreply(self.ctx, code, xcode, list(lines)), "smfi_setmlreply")

    def addheader(self, name: bytes, value: bytes) -> None:
        if self.lib.smfi_addheader(self.ctx, name, value) != c.MI_SUCCESS:
            self._refused("smfi_addheader")  # inline check: this runs for most messages

    def insheader(self, index: int, name: bytes, value: bytes) -> None:
        self._check(self.lib.smfi_insheader(self.ctx, index, name, value), "smfi_insheader")

    def chgheader(self, name: bytes, index: int, value: bytes | None) -> None:
        self._check(self.lib.smfi_chgheader(self.ctx, name, index, value), "smfi_chgheader")

    def chgfrom(self, sender: bytes, params: bytes | None) -> None:
        self._check(self.lib.smfi_chgfrom(self.ctx, sender, params), "smfi_chgfrom")

    def addrcpt(self, recipient: bytes, params: bytes | None) -> None:
        if params is None:
            self._check(self.lib.smfi_addrcpt(self.ctx, recipient), "smfi_addrcpt")
        else:
            self._check(
                self.lib.smfi_addrcpt_par(self.ctx, recipient, params), "smfi_addrcpt_par"
            )

    def delrcpt(self, recipient: bytes) -> None:
        self._check(self.lib.smfi_delrcpt(self.ctx, recipient), "smfi_delrcpt")

    def replacebody(self, chunk: bytes) -> None:
        # smfi_replacebody takes an int length: hand over large bodies in pieces.
        step = 1 << 30
        for start in range(0, max(len(chunk), 1), step):
            piece = chunk[start : start + step]
            self._check(
                self.lib.smfi_replacebody(self.ctx, piece, len(piece)), "smfi_replacebody"
            )

    def progress(self) -> None:
        self._check(self.lib.smfi_progress(self.ctx), "smfi_progress")

    def quarantine(self, reason: bytes) -> None:
        self._check(self.lib.smfi_quarantine(self.ctx, reason), "smfi_quarantine")


class LibmilterCallbacks(SessionRules):
    """Owns the live sessions of one runner and builds libmilter's callback table."""

    def __init__(
        self,
        session_class: type[MilterSession],
        lib: c.Libmilter,
        error_status: Status,
        on_fatal: Callable[[BaseException], None],
        tcp: bool = False,
    ) -> None:
        super().__init__(session_class, error_status, tcp=tcp)
        self.lib = lib
        self.on_fatal = on_fatal
        self.sessions: dict[int, MilterSession] = {}
        # Running negotiate/abort/close callbacks; a running stage shows in `in_stage`.
        self.active: dict[int, str] = {}
        self.stopping = False
        """Set when a stop begins: no session is created after it."""

    def fatal(self, exc: BaseException, stage: str) -> None:
        super().fatal(exc, stage)
        self.on_fatal(exc)

    # -- trampolines -----------------------------------------------------------------------

    def _create(self, ctx: int) -> MilterSession | None:
        if self.stopping:
            return None
        session = self.create(CtxBackend(self.lib, ctx))
        self.sessions[ctx] = session
        return session

    def _stage(
        self, stage: str, convert: Callable[..., tuple[Any, ...]] | None
    ) -> Callable[..., int]:
        """The callback of one reply-giving stage: the shared `stage_callback`, keyed by ctx."""
        return self.stage_callback(
            stage,
            self.sessions.get,
            self._create,
            convert,
            envelope=convert is _envelope,
            keyed=convert is _unknown,  # the only conversion that needs the context
            pins=pins,
            pin=pin_thread_state,
        )

    def in_flight(self) -> bool:
        """Whether a callback is running (a stop waits for it before closing sessions)."""
        if self.active:
            return True
        in_stage = self.in_stage
        return any(in_stage(s) is not None for s in list(self.sessions.values()))

    @contextlib.contextmanager
    def _running(self, ctx: int, stage: str) -> Iterator[None]:
        """Mark a (non-hot) callback as running, so a stop waits for it to finish."""
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
        session = self.sessions.get(ctx)
        if session is not None:
            with self._running(ctx, "on_abort"):
                self.abort(session)
        return Status.CONTINUE

    def _close(self, ctx: int) -> int:
        session = self.sessions.pop(ctx, None)
        if session is not None:
            with self._running(ctx, "on_close"):
                self.close(session)
        return Status.CONTINUE

    def close_all(self) -> int:
        """Run on_close for sessions libmilter abandoned (at stop); returns how many.

        A session whose stage is still running is left alone (its calls never overlap):
        it is logged, and the process ends around it.
        """
        count = 0
        while self.sessions:
            _, session = self.sessions.popitem()
            running = self.in_stage(session)
            if running is not None:
                logger.warning(
                    "a session is still in %s at stop: not closed",
                    running,
                    extra={"pmk_session": session},
                )
                continue
            count += 1
            self.abort(session)
            self.close(session)
        return count

    def descriptor(self, name: bytes) -> c.SmfiDesc:
        """The smfiDesc with a callback for each overridden stage, plus negotiate and close."""
        stages = self.spec.stages
        make = c.Callbacks.make
        desc = c.SmfiDesc()
        desc.xxfi_name = name
        desc.xxfi_version = c.SMFI_VERSION
        desc.xxfi_flags = int(self.spec.actions)

        # Per stage: the C argument shape and the conversion to the method's arguments; the
        # smfiDesc field comes from the stage table.
        table: dict[str, tuple[str, Callable[..., tuple[Any, ...]] | None]] = {
            "on_connect": (
                "connect",
                lambda host, addr: (decode(host or b""), c.sockaddr_to_address(addr)),
            ),
            "on_helo": ("str1", lambda host: (decode(host or b""),)),
            "on_mail": ("argv", _envelope),
            "on_rcpt": ("argv", _envelope),
            "on_data": ("ctx", None),
            "on_unknown": ("ptr1", _unknown),
            "on_header": ("str2", lambda n, v: (decode(n or b""), decode(v or b""))),
            "on_eoh": ("ctx", None),
            "on_body": ("body", lambda p, n: (c.body_bytes(p, n),)),
            "on_eom": ("ctx", None),
        }
        assert set(table) == set(BY_METHOD)
        for stage, (shape, convert) in table.items():
            if stage in stages:
                field = BY_METHOD[stage].callback
                setattr(desc, field, make(shape, self._stage(stage, convert)))
        if self.answer_data:  # TCP without on_data: see SessionRules.__init__
            desc.xxfi_data = make("ctx", _continue)
        desc.xxfi_negotiate = make("negotiate", self._negotiate)
        desc.xxfi_close = make("ctx", self._close)
        if "on_abort" in stages:
            desc.xxfi_abort = make("ctx", self._abort)
        return desc


def _unknown(ctx: int, cmd: int | None) -> tuple[str]:
    """xxfi_unknown's command: only its packet's bytes (libmilter does not check the NUL)."""
    return (decode(c.unknown_command(ctx, cmd)),)


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
