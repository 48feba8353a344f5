"""The harness engine: an in-process port of libmilter's engine around the runner's rule set.

Theory of operation
-------------------
The harness must answer exactly as a filter run by the real runner would, so this module plays
both layers the real runner has, fed with the same packets the wire client sends:

* `_Engine` is libmilter's side: its command table and state machine (`mi_engine`,
  `trans_ok`, `fix_stm`), the per-stage macro slots and `smfi_getsymval`'s lookup order, option
  negotiation (`st_optionneg`, including the faked no-reply bits and the "does not fulfil
  requirements" aborts), `sendreply` (custom replies used only when their class matches,
  no-reply stages silenced), and the `smfi_*` action calls with `mi_sendok`'s state check.
  Only stages the class overrides are "registered", as the runner registers only those.
* `_HarnessRules` is the runner's session handling itself (`pymilterkit._dispatch.SessionRules`,
  which the real trampolines use too): one session per connection, created at negotiate (and
  again at connect after QUIT_NC), the error policy, `@noreply` stages, on_abort only while a
  message is in progress. With `tcp=True` it behaves as the runner on an inet socket.

Responses are queued as packets; the harness endpoint hands them to the same conversation code
the wire client uses. A command libmilter would not answer leaves the queue empty, and the
conversation reports a timeout, just as against a real milter.
"""

from __future__ import annotations

import collections
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

from .._dispatch import SessionRules
from .._errors import LibmilterError, ProtocolError
from .._flags import NOREPLY_MASK, Actions, ProtocolOpts, Status
from .._protocol import MI_FAILURE, STAGES
from .._session import STAGE_FLAGS, MilterSession
from .._types import EsmtpParams, decode
from . import _wire as w

__all__ = ["InProcessMilter"]

logger = logging.getLogger("pymilterkit")

# libmilter states (engine.c)
ST_NONE, ST_INIT, ST_OPTS, ST_CONN, ST_HELO, ST_MAIL, ST_RCPT = -1, 0, 1, 2, 3, 4, 5
ST_DATA, ST_HDRS, ST_EOHS, ST_BODY, ST_ENDM, ST_QUIT, ST_ABRT = 6, 7, 8, 9, 10, 11, 12
ST_UNKN, ST_Q_NC, ST_SKIP = 13, 14, 16
_STATE_OF = {
    "on_connect": ST_CONN, "on_helo": ST_HELO, "on_mail": ST_MAIL, "on_rcpt": ST_RCPT,
    "on_data": ST_DATA, "on_unknown": ST_UNKN, "on_header": ST_HDRS, "on_eoh": ST_EOHS,
    "on_body": ST_BODY, "on_eom": ST_ENDM,
}
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

# macro slots (CI_*) and the stage each command stores into / clears after
CI_NONE, CI_CONN, CI_HELO, CI_MAIL, CI_RCPT, CI_DATA, CI_EOM, CI_EOH = -1, 0, 1, 2, 3, 4, 5, 6
_MACRO_SLOTS = 7
_MACRO_SLOT_OF = {info.command: int(info.macros) for info in STAGES if info.macros is not None}

# internal return codes of libmilter's command functions
_KEEP, _ABORT, _OPTIONS, _FAIL, _NONE = 20, 21, 22, -1, -2

_CT_IGNO, _CT_END = 0x1, 0x8

_NR_BIT = {_STATE_OF[info.method]: info.noreply for info in STAGES if info.noreply}
_SMFI_INTERNAL = 0x70000000
_SMFI_V1_ACTS, _SMFI_V1_PROT = 0xF, 0x3F
_U32 = struct.Struct(">I")


class _Backend:
    """The smfi_* calls of one context, as packets into the engine's output queue."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine

    def _sendok(self, flag: Actions, function: str) -> None:
        e = self.engine
        if not (flag & e.aflags or flag == Actions.NONE) or e.state != ST_ENDM:
            raise LibmilterError(
                f"libmilter refused {function} (MI_FAILURE): the MTA connection may be gone, "
                f"or the action was not negotiated"
            )

    def getsymval(self, name: bytes) -> bytes | None:
        return self.engine.getsymval(name)

    def setreply(self, code: bytes, xcode: bytes | None, lines: Sequence[bytes]) -> None:
        if len(lines) <= 1:
            buf = code + b" "
            if xcode is not None:
                buf += xcode
            if lines:
                if xcode is not None:
                    buf += b" "
                buf += lines[0]
        else:
            xc = xcode if xcode is not None else (b"4.0.0" if code[:1] == b"4" else b"5.0.0")
            parts = []
            for number, line in enumerate(lines, 1):
                sep = b" " if number == len(lines) else b"-"
                parts.append(code + sep + xc + b" " + line)
            buf = b"\r\n".join(parts)
        self.engine.reply = buf

    def addheader(self, name: bytes, value: bytes) -> None:
        self._sendok(Actions.ADD_HEADER, "smfi_addheader")
        self.engine.emit(w.ADDHEADER, name + b"\0" + value + b"\0")

    def insheader(self, index: int, name: bytes, value: bytes) -> None:
        self._sendok(Actions.ADD_HEADER, "smfi_insheader")
        self.engine.emit(w.INSHEADER, _U32.pack(index) + name + b"\0" + value + b"\0")

    def chgheader(self, name: bytes, index: int, value: bytes | None) -> None:
        self._sendok(Actions.CHANGE_HEADER, "smfi_chgheader")
        self.engine.emit(w.CHGHEADER, _U32.pack(index) + name + b"\0" + (value or b"") + b"\0")

    def chgfrom(self, sender: bytes, params: bytes | None) -> None:
        self._sendok(Actions.CHANGE_FROM, "smfi_chgfrom")
        data = sender + b"\0" + (params + b"\0" if params is not None else b"")
        self.engine.emit(w.CHGFROM, data)

    def addrcpt(self, recipient: bytes, params: bytes | None) -> None:
        if params is None:
            self._sendok(Actions.ADD_RCPT, "smfi_addrcpt")
            self.engine.emit(w.ADDRCPT, recipient + b"\0")
        else:
            self._sendok(Actions.ADD_RCPT_PAR, "smfi_addrcpt_par")
            self.engine.emit(w.ADDRCPT_PAR, recipient + b"\0" + params + b"\0")

    def delrcpt(self, recipient: bytes) -> None:
        self._sendok(Actions.DELETE_RCPT, "smfi_delrcpt")
        self.engine.emit(w.DELRCPT, recipient + b"\0")

    def replacebody(self, chunk: bytes) -> None:
        self._sendok(Actions.CHANGE_BODY, "smfi_replacebody")
        offset = 0
        while True:
            piece = chunk[offset : offset + w.MAX_DATA]
            self.engine.emit(w.REPLBODY, piece)
            offset += len(piece)
            if offset >= len(chunk):
                break

    def progress(self) -> None:
        # smfi_progress has no state check in libmilter (the session API has one).
        self.engine.emit(w.PROGRESS, b"")

    def quarantine(self, reason: bytes) -> None:
        self._sendok(Actions.QUARANTINE, "smfi_quarantine")
        self.engine.emit(w.QUARANTINE, reason + b"\0")


def _arguments(*args: Any) -> tuple[Any, ...]:
    return args  # the engine has decoded them already


class _HarnessRules(SessionRules):
    """The runner's session handling (`SessionRules`, shared with the trampolines) for one
    libmilter context, recording the exceptions stage methods raise."""

    def __init__(
        self,
        engine: _Engine,
        session_class: type[MilterSession],
        error_status: Status,
        reraise: bool,
        tcp: bool = False,
    ) -> None:
        super().__init__(session_class, error_status, tcp=tcp)
        self.engine = engine
        self.reraise = reraise
        self.session: MilterSession | None = None
        self.errors: list[tuple[str, BaseException]] = []
        self._callbacks: dict[tuple[str, bool], Callable[..., int]] = {}

    def report_error(self, exc: BaseException, stage: str) -> None:
        self.errors.append((stage, exc))
        super().report_error(exc, stage)
        if self.reraise:
            raise exc

    def fatal(self, exc: BaseException, stage: str) -> None:
        raise exc  # KeyboardInterrupt / SystemExit: in a test, stop the test

    def _create(self, key: object = None) -> MilterSession:
        self.session = self.create(_Backend(self.engine))
        return self.session

    def _current(self, key: object) -> MilterSession | None:
        return self.session

    def stage(self, stage: str, *args: Any) -> int:
        """Run `stage` with the runner's own stage callback (`SessionRules.stage_callback`)."""
        callback = self._callbacks.get((stage, bool(args)))
        if callback is None:
            callback = self._callbacks[stage, bool(args)] = self.stage_callback(
                stage, self._current, self._create, _arguments if args else None
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
        if self.session is not None:
            super().abort(self.session)

    def close_context(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            super().close(session)


class _Engine:
    """libmilter's per-connection engine (mi_engine and the st_* functions)."""

    def __init__(self, dispatch_factory: Callable[[_Engine], _HarnessRules]) -> None:
        self.out: collections.deque[w.Packet] = collections.deque()
        self.closed = False
        self.state = ST_INIT
        self.dispatch = dispatch_factory(self)
        registered = self.dispatch.spec.stages
        self.registered = registered
        preset = ProtocolOpts.NONE
        for name, (off_flag, _nr) in STAGE_FLAGS.items():
            if name not in registered:
                preset |= off_flag
        self.pflags = int(preset)
        self.pflags2mta = self.pflags
        self.mta_pflags = 0
        self.aflags = int(self.dispatch.spec.actions)
        self.mta_aflags = 0
        self.version2mta = w.PROTOCOL_VERSION
        self.reply: bytes | None = None
        self.macros: list[list[tuple[bytes, bytes]] | None] = [None] * _MACRO_SLOTS
        self.symlist: dict[int, bytes] = {}
        self.next_states = list(_NEXT_STATES)
        self._fix_stm()
        self.commands: dict[bytes, tuple[int, int, int, Callable[[bytes, int], int]]] = {
            w.ABORT: (ST_ABRT, 0, CI_NONE, self.st_abort),
            w.MACRO: (ST_NONE, 0, CI_NONE, self.st_macros),
            w.BODY: (ST_BODY, 0, CI_NONE, self.st_body),
            w.CONNECT: (ST_CONN, 0, CI_CONN, self.st_connect),
            w.BODYEOB: (ST_ENDM, 0, CI_EOM, self.st_bodyend),
            w.HELO: (ST_HELO, 0, CI_HELO, self.st_helo),
            w.HEADER: (ST_HDRS, 0, CI_NONE, self.st_header),
            w.MAIL: (ST_MAIL, 0, CI_MAIL, self.st_mail),
            w.OPTNEG: (ST_OPTS, 0, CI_NONE, self.st_optneg),
            w.EOH: (ST_EOHS, 0, CI_EOH, self.st_eoh),
            w.QUIT: (ST_QUIT, _CT_END, CI_NONE, self.st_quit),
            w.DATA: (ST_DATA, 0, CI_DATA, self.st_data),
            w.RCPT: (ST_RCPT, _CT_IGNO, CI_RCPT, self.st_rcpt),
            w.UNKNOWN: (ST_UNKN, _CT_IGNO, CI_NONE, self.st_unknown),
            w.QUIT_NC: (ST_Q_NC, 0, CI_NONE, self.st_quit),
        }

    # -- helpers ---------------------------------------------------------------------------

    def emit(self, cmd: bytes, data: bytes) -> None:
        self.out.append((cmd, data))

    def _fix_stm(self) -> None:
        fl = self.pflags
        for info in STAGES:
            if fl & info.off:
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

    def _registered(self, stage: str) -> bool:
        return stage in self.registered

    # -- the engine loop, one command at a time -------------------------------------------

    def handle(self, cmd: bytes, data: bytes) -> None:
        """Process one packet from the MTA, queueing whatever libmilter would answer."""
        if self.closed:
            raise ProtocolError("the milter has closed the connection")
        entry = self.commands.get(cmd)
        if entry is None:
            self._fail()
            return
        newstate, todo, macro_idx, function = entry
        call_abort = ST_MAIL <= self.state < ST_ENDM
        if newstate != ST_NONE and not self._trans_ok(self.state, newstate):
            if call_abort and self._registered("on_abort"):
                self.dispatch.abort_context()
            self.state = ST_HELO
            if not self._trans_ok(self.state, newstate):
                return
        if newstate != ST_NONE:
            self.state = newstate
        r = function(data, macro_idx)
        if not self._sendreply(r):
            self._fail()
            return
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

    def eof(self) -> None:
        """The MTA closed the connection."""
        if not self.closed:
            self._fail()

    def _fail(self) -> None:
        if ST_MAIL <= self.state < ST_ENDM and self._registered("on_abort"):
            self.dispatch.abort_context()
        if self.state != ST_QUIT:
            self.dispatch.close_context()
        self.closed = True

    def _sendreply(self, r: int) -> bool:
        bit = _NR_BIT.get(self.state, 0)
        if bit and self.pflags & bit and r != Status.NOREPLY:
            if Status.CONTINUE <= r < _KEEP:
                logger.debug("libmilter: milter claimed not to reply but did anyway (%d)", r)
            if r in (Status.CONTINUE, Status.TEMPFAIL, Status.REJECT, Status.DISCARD,
                     Status.ACCEPT, Status.SKIP, _OPTIONS):
                r = Status.NOREPLY
        if r == Status.CONTINUE:
            self.emit(w.CONTINUE, b"")
        elif r in (Status.TEMPFAIL, Status.REJECT):
            first = b"4" if r == Status.TEMPFAIL else b"5"
            if self.reply is not None and self.reply[:1] == first:
                self.emit(w.REPLYCODE, self.reply + b"\0")
                self.reply = None
            else:
                self.emit(w.REJECT if r == Status.REJECT else w.TEMPFAIL, b"")
        elif r == Status.DISCARD:
            self.emit(w.DISCARD, b"")
        elif r == Status.ACCEPT:
            self.emit(w.ACCEPT, b"")
        elif r == Status.SKIP:
            self.emit(w.SKIP, b"")
        elif r == _OPTIONS:
            data = _U32.pack(self.version2mta) + _U32.pack(self.aflags)
            data += _U32.pack(self.pflags2mta)
            for where in sorted(self.symlist):
                data += _U32.pack(where) + self.symlist[where] + b"\0"
            self.emit(w.OPTNEG, data)
        elif r == Status.NOREPLY and bit and self.pflags & bit and not self.mta_pflags & bit:
            # The milter wants no reply but the MTA cannot do without: libmilter fakes one.
            self.emit(w.CONTINUE, b"")
        return True

    # -- command functions (st_*) ----------------------------------------------------------

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
        self.aflags = aflags
        self.pflags = pflags
        self.pflags2mta = pflags
        if self.pflags2mta & ~self.mta_pflags:
            for bit in range(32):
                b = 1 << bit
                if not self.mta_pflags & b and fake & b:
                    self.pflags2mta &= ~b
        if self.aflags & ~self.mta_aflags:
            logger.error(
                "libmilter: 0x%x does not fulfill action requirements 0x%x",
                self.mta_aflags,
                self.aflags,
            )
            return _ABORT
        for flag in (ProtocolOpts.NO_DATA, ProtocolOpts.NO_UNKNOWN):
            if self.pflags2mta & flag and not self.mta_pflags & flag:
                self.pflags2mta &= ~flag
        if self.pflags2mta & ~self.mta_pflags:
            logger.error(
                "libmilter: 0x%x does not fulfill protocol requirements 0x%x",
                self.mta_pflags,
                self.pflags2mta,
            )
            return _ABORT
        self._fix_stm()
        self.pflags2mta &= ~_SMFI_INTERNAL
        return _OPTIONS

    def st_macros(self, data: bytes, idx: int) -> int:
        if not data:
            return _FAIL
        slot = _MACRO_SLOT_OF.get(data[:1])
        items = data[1:].split(b"\0")
        if slot is None or len(items) < 2:
            return _FAIL
        items = items[:-1]
        pairs = list(zip(items[0::2], items[1::2], strict=False))
        self.macros[slot] = pairs
        return _KEEP

    def st_connect(self, data: bytes, idx: int) -> int:
        self._clear_macros(idx + 1)
        if not self._registered("on_connect"):
            return Status.CONTINUE
        try:
            host, address = w.decode_connect(data)
        except ProtocolError:
            return _ABORT
        return self.dispatch.stage("on_connect", decode(host), address)

    def st_helo(self, data: bytes, idx: int) -> int:
        self._clear_macros(idx + 1)
        if not self._registered("on_helo"):
            return Status.CONTINUE
        if not data.endswith(b"\0"):
            return MI_FAILURE
        return self.dispatch.stage("on_helo", decode(data.split(b"\0", 1)[0]))

    def _argv(self, stage: str, data: bytes, idx: int) -> int:
        self._clear_macros(idx + 1)
        if not self._registered(stage):
            return Status.CONTINUE
        if b"\0" not in data:
            return _ABORT
        args = data.split(b"\0")
        if data.endswith(b"\0"):
            args = args[:-1]
        if not args:
            return self.dispatch.stage(stage, "", EsmtpParams())
        return self.dispatch.stage(
            stage, decode(args[0]), EsmtpParams([decode(a) for a in args[1:]])
        )

    def st_mail(self, data: bytes, idx: int) -> int:
        return self._argv("on_mail", data, idx)

    def st_rcpt(self, data: bytes, idx: int) -> int:
        return self._argv("on_rcpt", data, idx)

    def st_unknown(self, data: bytes, idx: int) -> int:
        if not self._registered("on_unknown"):
            return Status.CONTINUE
        return self.dispatch.stage("on_unknown", decode(data.split(b"\0", 1)[0]))

    def st_data(self, data: bytes, idx: int) -> int:
        if not self._registered("on_data"):
            return Status.CONTINUE
        return self.dispatch.stage("on_data")

    def st_header(self, data: bytes, idx: int) -> int:
        if not self._registered("on_header"):
            return Status.CONTINUE
        if not data.endswith(b"\0"):
            return _ABORT
        end = data.find(b"\0", 1)
        if end < 0 or end >= len(data) - 1:
            return _ABORT
        name, value = data[:end], data[end + 1 : -1].split(b"\0", 1)[0]
        return self.dispatch.stage("on_header", decode(name), decode(value))

    def st_eoh(self, data: bytes, idx: int) -> int:
        if not self._registered("on_eoh"):
            return Status.CONTINUE
        return self.dispatch.stage("on_eoh")

    def st_body(self, data: bytes, idx: int) -> int:
        if not self._registered("on_body"):
            return Status.CONTINUE
        return self.dispatch.stage("on_body", data)

    def st_bodyend(self, data: bytes, idx: int) -> int:
        r: int = Status.CONTINUE
        if self._registered("on_body") and data:
            r = self.dispatch.stage("on_body", data)
            if r != Status.CONTINUE:
                self._sendreply(r)
        if r == Status.CONTINUE and self._registered("on_eom"):
            return self.dispatch.stage("on_eom")
        return r

    def st_abort(self, data: bytes, idx: int) -> int:
        if self._registered("on_abort"):
            self.dispatch.abort_context()
        return Status.NOREPLY

    def st_quit(self, data: bytes, idx: int) -> int:
        self.dispatch.close_context()
        self._clear_macros(0)
        return Status.NOREPLY


class InProcessMilter:
    """A session class behind libmilter's engine, spoken to with packets, in this process."""

    def __init__(
        self,
        session_class: type[MilterSession],
        *,
        error_status: Status = Status.TEMPFAIL,
        reraise: bool = False,
        tcp: bool = False,
    ) -> None:
        self.engine = _Engine(
            lambda e: _HarnessRules(e, session_class, error_status, reraise, tcp=tcp)
        )

    @property
    def errors(self) -> list[tuple[str, BaseException]]:
        """Exceptions raised by stage methods so far (stage name, exception)."""
        return self.engine.dispatch.errors

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def send(self, cmd: bytes, data: bytes) -> None:
        self.engine.handle(cmd, data)

    def receive(self) -> w.Packet | None:
        """The next queued response, or None if libmilter would not (yet) have sent one."""
        return self.engine.out.popleft() if self.engine.out else None

    def close(self) -> None:
        self.engine.eof()
