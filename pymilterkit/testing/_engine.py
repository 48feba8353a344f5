"""The harness engine: an in-process port of libmilter's engine around the runner's rule set.

The harness must answer exactly as the real runner would, so it plays both of its layers, fed
the packets the wire client sends:

* `Engine` is libmilter: its command table and state machine (`mi_engine`, `trans_ok`,
  `fix_stm`), macro slots and `smfi_getsymval`'s lookup order, option negotiation
  (`st_optionneg`), `sendreply` and the `smfi_*` calls with `mi_sendok`'s state check. Only the
  stages the class overrides are registered, as in the runner.
* `_HarnessRules` is the runner's own session handling (`_dispatch.SessionRules`): one session
  per connection, the error policy, `@noreply`, on_abort only inside a message. With `tcp=True`
  it behaves as the runner on an inet socket.

Its answers are queued as packets for the conversation code the wire client uses; a command
libmilter would not answer leaves the queue empty, and the conversation reports a timeout.
"""

from __future__ import annotations

import collections
import logging
import struct
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from .._dispatch import SessionRules
from .._errors import LibmilterError, MilterTimeout, ProtocolError, StageResultError
from .._flags import ProtocolOpts, Stage, Status
from .._loop import InlineLoop
from .._protocol import (
    ACTION,
    MI_FAILURE,
    NOREPLY_MASK,
    REPLY_CLASS,
    REPLY_LETTER,
    REPLYCODE,
    STAGES,
    ActionBackend,
    ActionInfo,
)
from .._session import MilterSession
from .._types import EsmtpParams, decode
from . import _wire as w
from ._results import Step

__all__ = ["Engine", "reply_text"]

logger = logging.getLogger("pymilterkit")

# libmilter states (engine.c)
ST_NONE, ST_INIT, ST_OPTS, ST_CONN, ST_HELO, ST_MAIL, ST_RCPT = -1, 0, 1, 2, 3, 4, 5
ST_DATA, ST_HDRS, ST_EOHS, ST_BODY, ST_ENDM, ST_QUIT, ST_ABRT = 6, 7, 8, 9, 10, 11, 12
ST_UNKN, ST_Q_NC, ST_SKIP = 13, 14, 16
_STATE_OF = {info.method: info.state for info in STAGES}
"""The engine state of each stage of `_protocol.STAGES`."""


def _mask(*states: int) -> int:
    out = 0
    for state in states:
        out |= 1 << state
    return out


_NEXT_STATES = (
    _mask(ST_OPTS),  # INIT
    _mask(ST_CONN, ST_UNKN),  # OPTS
    _mask(ST_HELO, ST_MAIL, ST_UNKN),  # CONN
    _mask(ST_HELO, ST_MAIL, ST_UNKN),  # HELO
    _mask(ST_RCPT, ST_ABRT, ST_UNKN),  # MAIL
    _mask(ST_HDRS, ST_EOHS, ST_DATA, ST_BODY, ST_ENDM, ST_RCPT, ST_ABRT, ST_UNKN),  # RCPT
    _mask(ST_EOHS, ST_HDRS, ST_ABRT),  # DATA
    _mask(ST_EOHS, ST_HDRS, ST_ABRT),  # HDRS
    _mask(ST_BODY, ST_ENDM, ST_ABRT),  # EOHS
    _mask(ST_ENDM, ST_BODY, ST_ABRT),  # BODY
    _mask(ST_QUIT, ST_MAIL, ST_UNKN, ST_Q_NC),  # ENDM
    0,  # QUIT
    0,  # ABRT
    _mask(ST_HELO, ST_MAIL, ST_RCPT, ST_ABRT, ST_DATA, ST_BODY, ST_UNKN, ST_QUIT, ST_Q_NC),
    _mask(ST_CONN, ST_UNKN),  # Q_NC
)
_NX_SKIP = 1 << ST_SKIP

# macro slots (CI_*: the SMFIM_* stage each command stores into / clears after)
CI_NONE, CI_EOM, _MACRO_SLOTS = -1, int(Stage.EOM), 7
_MACRO_SLOT_OF = {info.command: int(info.macros) for info in STAGES if info.macros is not None}

# internal return codes of libmilter's command functions
_KEEP, _ABORT, _OPTIONS = 20, 21, 22

_CT_IGNO, _CT_END = 0x1, 0x8

_NR_BIT = {_STATE_OF[info.method]: info.noreply for info in STAGES if info.noreply}
_SMFI_INTERNAL = 0x70000000
_OLD_MTA_SENDS = int(ProtocolOpts.NO_DATA | ProtocolOpts.NO_UNKNOWN)
_SMFI_V1_ACTS, _SMFI_V1_PROT = 0xF, 0x3F
_U32 = struct.Struct(">I")


def reply_text(code: bytes, xcode: bytes | None, lines: Sequence[bytes]) -> bytes:
    """The reply text smfi_setreply (one line) or smfi_setmlreply (several) makes."""
    if len(lines) <= 1:
        buf = code + b" "
        if xcode is not None:
            buf += xcode
        if lines:
            if xcode is not None:
                buf += b" "
            buf += lines[0]
        return buf
    xc = xcode if xcode is not None else (b"4.0.0" if code[:1] == b"4" else b"5.0.0")
    parts = []
    for number, line in enumerate(lines, 1):
        sep = b" " if number == len(lines) else b"-"
        parts.append(code + sep + xc + b" " + line)
    return b"\r\n".join(parts)


class _Backend(ActionBackend):
    """The smfi_* calls of one context, as packets into the engine's output queue: each action
    is its table row's command, with its arguments packed as libmilter packs them (an int as 4
    bytes, a string NUL-terminated, a missing one left out)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def act(self, action: ActionInfo, *args: Any) -> None:
        data = b"".join(
            _U32.pack(arg) if isinstance(arg, int) else arg + b"\0"
            for arg in args
            if arg is not None
        )
        self._emit(action, data)

    def _emit(self, action: ActionInfo, data: bytes) -> None:
        """`mi_sendok`'s check (the action was negotiated, the stage is eom), then the packet."""
        e = self.engine
        if not action.flag & e.aflags or e.state != ST_ENDM:
            raise LibmilterError(
                f"libmilter refused {action.function} (MI_FAILURE): the MTA connection may be "
                f"gone, or the action was not negotiated"
            )
        e.emit(action.command, data)

    def getsymval(self, name: bytes) -> bytes | None:
        return self.engine.getsymval(name)

    def set_reply(self, code: bytes, xcode: bytes | None, lines: Sequence[bytes]) -> None:
        self.engine.reply = reply_text(code, xcode, lines)

    def change_header(self, name: bytes, index: int, value: bytes) -> None:
        self.act(ACTION["change_header"], index, name, value)  # the index goes first

    def delete_header(self, name: bytes, index: int) -> None:
        self.act(ACTION["delete_header"], index, name, b"")

    def replace_body(self, chunk: bytes) -> None:
        for offset in range(0, max(len(chunk), 1), w.MAX_DATA):  # one packet at least
            self._emit(ACTION["replace_body"], chunk[offset : offset + w.MAX_DATA])

    def progress(self) -> None:
        # smfi_progress has no state check in libmilter (the session API has one).
        self.engine.emit(ACTION["progress"].command, b"")


_ARGUMENTS: tuple[Callable[..., tuple[Any, ...]] | None, ...] = (
    None, lambda a, b: (a,), lambda a, b: (a, b)
)
"""By how many arguments a stage method takes: the callback's `convert` (the engine has
decoded them already)."""


class _HarnessRules(SessionRules):
    """The runner's session handling (`SessionRules`, shared with the trampolines) for one
    libmilter context, recording the exceptions stage methods raise."""

    def __init__(
        self,
        engine: Engine,
        session_class: type[MilterSession],
        error_status: Status,
        reraise: bool,
        tcp: bool,
        loop: InlineLoop | None = None,
        deadlines: Mapping[str, float | None] | None = None,
        timeout_status: Status = Status.TEMPFAIL,
    ) -> None:
        super().__init__(session_class, error_status, tcp=tcp, deadlines=deadlines,
                         timeout_status=timeout_status)
        self.engine = engine
        self.reraise = reraise
        self.loop = loop or InlineLoop()
        self.sessions: dict[None, MilterSession] = {}
        """The connection's session (keyed by None), once made."""
        self.errors: list[tuple[str, BaseException]] = []
        self._callbacks: dict[str, Callable[..., int]] = {}

    def report_error(
        self, exc: BaseException, stage: str, session: MilterSession | None = None
    ) -> None:
        self.errors.append((stage, exc))
        super().report_error(exc, stage, session)
        if self.reraise:
            raise exc

    def fatal(self, exc: BaseException, stage: str) -> None:
        raise exc  # KeyboardInterrupt / SystemExit: in a test, stop the test

    def run_coroutine(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run(coro)

    def bad_result(
        self, result: object, stage: str, session: MilterSession | None = None
    ) -> int:
        answer = super().bad_result(result, stage, session)
        if self.reraise and not isinstance(result, Status):
            exc = StageResultError(
                f"{self.session_class.__qualname__}.{stage} returned {result!r}, not a Status"
                + (" (declare it `async def`)" if isinstance(result, Awaitable) else "")
            )
            self.errors.append((stage, exc))
            raise exc
        return answer

    def _create(self, key: object = None) -> MilterSession:
        session = self.sessions[None] = self.create(_Backend(self.engine))
        return session

    def stage(self, stage: str, *args: Any) -> int:
        """Run `stage` with the runner's own stage callback (`SessionRules.stage_callback`)."""
        callback = self._callbacks.get(stage)
        if callback is None:
            callback = self._callbacks[stage] = self.stage_callback(
                stage, self.sessions, self._create, _ARGUMENTS[len(args)]
            )
        return callback(None, *args)

    def negotiate_context(self, f0: int, f1: int) -> tuple[int, int, int]:
        try:
            session = self._create()
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc, "on_negotiate")
            return Status.TEMPFAIL, 0, 0
        return super().negotiate(session, f0, f1, self.engine.setsymlist)

    def abort_context(self) -> None:
        session = self.sessions.get(None)
        if session is not None:
            super().abort(session)

    def close_context(self) -> None:
        session = self.sessions.pop(None, None)
        if session is not None:
            super().close(session)


_Parsed = tuple[Any, ...] | int
"""A stage command's method arguments, or the code libmilter answers a malformed packet with."""


def _connect(data: bytes) -> _Parsed:
    try:
        host, address = w.decode_connect(data)
    except ProtocolError:
        return _ABORT
    return decode(host), address


def _helo(data: bytes) -> _Parsed:
    return (decode(data.split(b"\0", 1)[0]),) if data.endswith(b"\0") else MI_FAILURE


def _argv(data: bytes) -> _Parsed:
    if b"\0" not in data:
        return _ABORT
    args = data.split(b"\0")
    if data.endswith(b"\0"):
        args = args[:-1]
    return decode(args[0]), EsmtpParams([decode(a) for a in args[1:]])


def _header(data: bytes) -> _Parsed:
    end = data.find(b"\0", 1)
    if not data.endswith(b"\0") or end < 0 or end >= len(data) - 1:
        return _ABORT
    return decode(data[:end]), decode(data[end + 1 : -1].split(b"\0", 1)[0])


_PARSE: dict[str, Callable[[bytes], _Parsed]] = {
    "on_connect": _connect, "on_helo": _helo, "on_mail": _argv, "on_rcpt": _argv,
    "on_data": lambda data: (), "on_unknown": lambda data: (decode(data.split(b"\0", 1)[0]),),
    "on_header": _header, "on_eoh": lambda data: (), "on_body": lambda data: (data,),
}
"""How libmilter's st_* function of each stage (but end of message) reads its packet."""
_CLEARS_MACROS = frozenset(("on_connect", "on_helo", "on_mail", "on_rcpt"))
_IGNORES_REFUSAL = frozenset(("on_rcpt", "on_unknown"))  # CT_IGNO: a refusal keeps the state


class Engine:
    """libmilter's per-connection engine (mi_engine and the st_* functions), in this process.

    It is the harness's endpoint: packets go in with `send`, what libmilter would write comes
    out of `receive`; nothing queued means libmilter would send nothing (the MTA times out).
    """

    def __init__(
        self,
        session_class: type[MilterSession],
        error_status: Status,
        reraise: bool,
        tcp: bool,
        loop: InlineLoop | None = None,
        deadlines: Mapping[str, float | None] | None = None,
        timeout_status: Status = Status.TEMPFAIL,
    ) -> None:
        self.out: collections.deque[w.Packet] = collections.deque()
        self.closed = False
        self.state = ST_INIT
        self.dispatch = _HarnessRules(self, session_class, error_status, reraise, tcp, loop,
                                      deadlines, timeout_status)
        self.registered = registered = self.dispatch.spec.stages  # the runner registers these
        self.pflags = sum(int(info.off) for info in STAGES if info.method not in registered)
        self.pflags2mta = self.pflags
        self.mta_pflags = self.mta_aflags = 0
        self.aflags = int(self.dispatch.spec.actions)
        self.version2mta = w.PROTOCOL_VERSION
        self.reply: bytes | None = None
        self.macros: list[list[tuple[bytes, bytes]] | None] = [None] * _MACRO_SLOTS
        self.symlist: dict[int, bytes] = {}
        self.next_states = list(_NEXT_STATES)
        self._fix_stm()
        self.commands: dict[bytes, tuple[int, int, int, Callable[[bytes, int], int]]] = {
            info.command: (
                _STATE_OF[info.method],
                _CT_IGNO if info.method in _IGNORES_REFUSAL else 0,
                CI_NONE if info.macros is None else int(info.macros),
                self._stage_command(info.method),
            )
            for info in STAGES
            if info.method != "on_eom"
        }
        self.commands.update({
            w.BODYEOB: (ST_ENDM, 0, CI_EOM, self.st_bodyend),
            w.ABORT: (ST_ABRT, 0, CI_NONE, self.st_abort),
            w.MACRO: (ST_NONE, 0, CI_NONE, self.st_macros),
            w.OPTNEG: (ST_OPTS, 0, CI_NONE, self.st_optneg),
            w.QUIT: (ST_QUIT, _CT_END, CI_NONE, self.st_quit),
            w.QUIT_NC: (ST_Q_NC, 0, CI_NONE, self.st_quit),
        })

    # -- the endpoint --------------------------------------------------------------------

    def send(self, cmd: bytes, data: bytes, step: Step) -> None:
        if self.closed:
            raise ProtocolError(f"the milter closed the connection before {step}")
        self.handle(cmd, data)

    def receive(self, step: Step) -> w.Packet:
        if self.out:
            return self.out.popleft()
        if self.closed:
            raise ProtocolError(f"the milter closed the connection during {step}")
        raise MilterTimeout(
            f"the milter sent no answer to {step} (libmilter would send nothing here; "
            f"a real MTA would time out)"
        )

    def close(self) -> None:
        """The MTA closed the connection."""
        if not self.closed:
            self._fail()

    # -- helpers ---------------------------------------------------------------------------

    def emit(self, cmd: bytes, data: bytes) -> None:
        self.out.append((cmd, data))

    def _fix_stm(self) -> None:
        for info in STAGES:
            if self.pflags & info.off:
                self.next_states[_STATE_OF[info.method]] |= _NX_SKIP

    def _trans_ok(self, old: int, new: int) -> bool:
        s = old
        while 0 <= s < len(self.next_states):
            if (1 << new) & self.next_states[s]:
                return True
            n = s + 1
            if n >= len(self.next_states) or not self.next_states[n] & _NX_SKIP:
                return False
            s = n
        return False

    def _clear_macros(self, start: int) -> None:
        for i in range(start, _MACRO_SLOTS):
            self.macros[i] = None

    def setsymlist(self, where: int, names: bytes) -> int:
        if not names or not 0 <= where < _MACRO_SLOTS or where in self.symlist:
            return MI_FAILURE
        self.symlist[where] = names
        return 0

    def getsymval(self, name: bytes) -> bytes | None:
        if not name:
            return None
        one = name[1:2] if len(name) == 3 and name[:1] == b"{" and name[2:] == b"}" else None
        braces = b"{" + name + b"}" if len(name) == 1 else None
        for slot in reversed(self.macros):
            for key, value in slot or ():
                if key in (name, one, braces):
                    return value
        return None

    # -- the engine loop, one command at a time -------------------------------------------

    def handle(self, cmd: bytes, data: bytes) -> None:
        """Process one packet from the MTA, queueing whatever libmilter would answer."""
        entry = self.commands.get(cmd)
        if entry is None:
            self._fail()
            return
        newstate, todo, macro_idx, function = entry
        call_abort = ST_MAIL <= self.state < ST_ENDM
        if newstate != ST_NONE and not self._trans_ok(self.state, newstate):
            if call_abort and "on_abort" in self.registered:
                self.dispatch.abort_context()
            self.state = ST_HELO
            if not self._trans_ok(self.state, newstate):
                return
        if newstate != ST_NONE:
            self.state = newstate
        r = function(data, macro_idx)
        self._sendreply(r)
        if r == Status.ACCEPT:
            self.state = ST_HELO
        elif r in (Status.REJECT, Status.DISCARD, Status.TEMPFAIL):
            if not todo & _CT_IGNO:
                self.state = ST_HELO
        elif r == _ABORT:
            self._fail()
            return
        if todo & _CT_END:
            self.closed = True

    def _fail(self) -> None:
        if ST_MAIL <= self.state < ST_ENDM and "on_abort" in self.registered:
            self.dispatch.abort_context()
        if self.state != ST_QUIT:
            self.dispatch.close_context()
        self.closed = True

    def _sendreply(self, r: int) -> None:
        bit = _NR_BIT.get(self.state, 0)
        if bit and self.pflags & bit and r != Status.NOREPLY:
            if Status.CONTINUE <= r < _KEEP:
                logger.debug("libmilter: milter claimed not to reply but did anyway (%d)", r)
            if r in (Status.CONTINUE, Status.TEMPFAIL, Status.REJECT, Status.DISCARD,
                     Status.ACCEPT, Status.SKIP, _OPTIONS):
                r = Status.NOREPLY
        letter = REPLY_LETTER.get(r)
        if letter is not None:
            if self.reply is not None and self.reply[:1] == REPLY_CLASS.get(r):
                self.emit(REPLYCODE, self.reply + b"\0")
                self.reply = None
            else:
                self.emit(letter, b"")
        elif r == _OPTIONS:
            data = _U32.pack(self.version2mta) + _U32.pack(self.aflags)
            data += _U32.pack(self.pflags2mta)
            for where in sorted(self.symlist):
                data += _U32.pack(where) + self.symlist[where] + b"\0"
            self.emit(w.OPTNEG, data)
        elif r == Status.NOREPLY and bit and self.pflags & bit and not self.mta_pflags & bit:
            # The milter wants no reply but the MTA cannot do without: libmilter fakes one.
            self.emit(w.CONTINUE, b"")

    # -- command functions (st_*) ----------------------------------------------------------

    def _stage_command(self, stage: str) -> Callable[[bytes, int], int]:
        """The st_* function of `stage`: read the packet, run the stage if it is registered."""
        parse, clears = _PARSE[stage], stage in _CLEARS_MACROS

        def st_stage(data: bytes, idx: int) -> int:
            if clears:
                self._clear_macros(idx + 1)
            if stage not in self.registered:
                return Status.CONTINUE
            args = parse(data)
            if isinstance(args, int):
                return args
            return self.dispatch.stage(stage, *args)

        return st_stage

    def st_optneg(self, data: bytes, idx: int) -> int:
        self._clear_macros(idx + 1)
        if len(data) < 12:
            return _ABORT
        version, mta_aflags, mta_pflags = struct.unpack(">III", data[:12])
        if version < 2:
            return _ABORT
        self.version2mta = min(w.PROTOCOL_VERSION, version)
        self.mta_aflags = mta_aflags or _SMFI_V1_ACTS
        self.mta_pflags = (mta_pflags or _SMFI_V1_PROT) & ~_SMFI_INTERNAL
        fake = int(NOREPLY_MASK)
        r, aflags, pflags = self.dispatch.negotiate_context(self.mta_aflags, self.mta_pflags | fake)
        if r != Status.CONTINUE:
            return _ABORT
        self.aflags, self.pflags = aflags, pflags
        self.pflags2mta = pflags & ~(fake & ~self.mta_pflags)  # the faked no-reply bits
        if self.aflags & ~self.mta_aflags:
            logger.error("libmilter: 0x%x does not fulfill action requirements 0x%x",
                         self.mta_aflags, self.aflags)
            return _ABORT
        self.pflags2mta &= ~(_OLD_MTA_SENDS & ~self.mta_pflags)  # an old MTA sends them anyway
        if self.pflags2mta & ~self.mta_pflags:
            logger.error("libmilter: 0x%x does not fulfill protocol requirements 0x%x",
                         self.mta_pflags, self.pflags2mta)
            return _ABORT
        self._fix_stm()
        self.pflags2mta &= ~_SMFI_INTERNAL
        return _OPTIONS

    def st_macros(self, data: bytes, idx: int) -> int:
        if not data:
            return MI_FAILURE
        slot = _MACRO_SLOT_OF.get(data[:1])
        items = data[1:].split(b"\0")
        if slot is None or len(items) < 2:
            return MI_FAILURE
        items = items[:-1]
        pairs = list(zip(items[0::2], items[1::2], strict=False))
        self.macros[slot] = pairs
        return _KEEP

    def st_bodyend(self, data: bytes, idx: int) -> int:
        r: int = Status.CONTINUE
        if "on_body" in self.registered and data:
            r = self.dispatch.stage("on_body", data)
            if r != Status.CONTINUE:
                self._sendreply(r)
        if r == Status.CONTINUE and "on_eom" in self.registered:
            return self.dispatch.stage("on_eom")
        return r

    def st_abort(self, data: bytes, idx: int) -> int:
        if "on_abort" in self.registered:
            self.dispatch.abort_context()
        return Status.NOREPLY

    def st_quit(self, data: bytes, idx: int) -> int:
        self.dispatch.close_context()
        self._clear_macros(0)
        return Status.NOREPLY
