"""MilterSession: one object per SMTP connection, and what its class negotiates.

Theory of operation
-------------------
A filter is a subclass. When the class is created (`__init_subclass__`) its negotiation is
computed once and stored on that very class as a `ClassSpec`: the stages it overrides (each
becomes a libmilter callback, every other stage is switched off with SMFIP_NO_*), the `@noreply`
stages (SMFIP_NR_*), and `actions`, `protocol` and `requested_macros` unioned over the MRO. A
subclass gets its own spec, so nothing stale is inherited.

At run time a driver (the ctypes runner, or the test harness) creates one instance per
connection, attaches a `SessionBackend` that carries actions out, and marks which stage is
running. The action methods check stage, declared flag and arguments before they reach the
backend, so the same rules hold in tests and in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from . import _validate as v
from ._errors import InvalidArgumentError, UndeclaredActionError, WrongStageError
from ._flags import Actions, ProtocolOpts, Stage, Status
from ._logging import SessionLog, session_log
from ._message import Message
from ._protocol import ALL_ACTIONS, ALL_LIBMILTER_OPTS, NO_STAGE_MASK, STAGES, SessionBackend
from ._types import EsmtpParams, InetAddress, UnixAddress, decode

__all__ = [
    "ABANDONED", "STAGE_FLAGS", "ClassSpec", "HookResult", "MilterSession", "StageResult",
    "noreply",
]

ABANDONED: set[asyncio.Task[Any]] = set()
"""The tasks of async stages answered at their deadline and left running (the runner adds and
removes them): their session calls raise, whatever stage their session is in by then."""


def _abandoned(method: str) -> None:
    """Raise if the running task is an abandoned stage's (only asked once one was abandoned)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop on this thread: a sync stage
        return
    if task in ABANDONED:
        raise WrongStageError(
            f"{method}(): this stage was answered at its deadline and abandoned; its session "
            "calls are refused (stop when cancelled: catch CancelledError only to clean up)"
        )

StageResult = Status | Awaitable[Status]
"""What a stage method returns: a `Status`, or (`async def`) an awaitable of one."""
CleanupResult = None | Awaitable[None]
"""What on_abort/on_close return: nothing, or (`async def`) an awaitable of nothing."""
HookResult = None | Awaitable[None]
"""What on_worker_start/on_worker_stop return: nothing, or (`async def`) an awaitable."""

_F = TypeVar("_F", bound=Callable[..., Any])

_NOREPLY_ATTR = "__pymilterkit_noreply__"

STAGE_FLAGS: dict[str, tuple[ProtocolOpts, ProtocolOpts]] = {
    info.method: (info.off, info.noreply) for info in STAGES if info.off
}
"""Stage method -> (flag that switches the stage off, flag that makes it no-reply)."""

OTHER_STAGES = (
    *(info.method for info in STAGES if not info.off), "on_abort", "on_close", "on_negotiate",
    "on_message",
)
COLLECTS = ("on_mail", "on_rcpt", "on_header", "on_eoh", "on_body", "on_eom", "on_abort",
            "on_close")
"""The stages a class with `on_message` gets, overridden or not: they collect the message."""
_ALL_ACTIONS = int(ALL_ACTIONS)
_ALL_OPTS = ALL_LIBMILTER_OPTS

# Enum class attributes go through EnumType.__getattr__ on Python 3.11 (~60 ns a lookup); the
# action methods, which can run for every message, use these module constants.
_ADD_HEADER, _CHANGE_HEADER, _CHANGE_FROM = (
    Actions.ADD_HEADER, Actions.CHANGE_HEADER, Actions.CHANGE_FROM
)
_ADD_RCPT, _ADD_RCPT_PAR, _DELETE_RCPT = Actions.ADD_RCPT, Actions.ADD_RCPT_PAR, Actions.DELETE_RCPT
_CHANGE_BODY, _QUARANTINE = Actions.CHANGE_BODY, Actions.QUARANTINE


_NOT_FINAL = (Status.SKIP, Status.NOREPLY)


def noreply(method: _F) -> _F:
    """Mark a stage method whose answer does not matter, so the MTA does not wait for it.

    Whatever the method returns is ignored: the stage is negotiated with its SMFIP_NR_* flag
    and nothing is sent back, so the MTA saves a round trip. Use it for stages that only
    collect data (e.g. `on_header`). Valid on on_connect, on_helo, on_mail, on_rcpt, on_data,
    on_unknown, on_header, on_eoh and on_body.
    """
    setattr(method, _NOREPLY_ATTR, True)
    return method


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """What a session class negotiates, computed once when the class is created."""

    stages: frozenset[str]
    """Names of the stage methods the class overrides (on_eom, on_abort, ... included)."""
    noreply: frozenset[str]
    actions: Actions
    protocol: ProtocolOpts
    """NO_* for stages not overridden, NR_* for @noreply stages, plus the class's `protocol`."""
    macros: Mapping[Stage, tuple[str, ...]]
    asynchronous: frozenset[str] = frozenset()
    """The overridden stages written `async def` (awaited on the milter's event loop)."""

    def negotiate(self, offered_actions: Actions, offered: ProtocolOpts) -> ProtocolOpts:
        """The protocol options to request from an MTA that offers `offered`.

        A NO_* bit the MTA does not know (an old protocol version) is left out: the MTA then
        sends that stage and libmilter answers it, as for any stage without a callback.
        """
        opts = ProtocolOpts(int(self.protocol) & ~(int(NO_STAGE_MASK) & ~int(offered)))
        if "on_body" in self.stages and offered & ProtocolOpts.SKIP:
            opts |= ProtocolOpts.SKIP
        return opts


def _union_over_mro(cls: type, attr: str, zero: Any) -> Any:
    value = zero
    for klass in cls.__mro__:
        value |= klass.__dict__.get(attr, zero)
    return value


def _merge_macros(cls: type) -> dict[Stage, tuple[str, ...]]:
    merged: dict[Stage, list[str]] = {}
    for klass in reversed(cls.__mro__):
        for stage, names in klass.__dict__.get("requested_macros", {}).items():
            if not isinstance(stage, Stage):
                raise TypeError(
                    f"{klass.__qualname__}.requested_macros: keys must be Stage, got {stage!r}"
                )
            if isinstance(names, str):
                raise TypeError(
                    f"{klass.__qualname__}.requested_macros[{stage.name}] must be a sequence "
                    f"of macro names, not one string"
                )
            bucket = merged.setdefault(stage, [])
            for name in names:
                if not isinstance(name, str):
                    raise TypeError(
                        f"{klass.__qualname__}.requested_macros[{stage.name}]: macro names are "
                        f"str, got {name!r}")
                v.text(name, "macro name")
                if not (name.isascii() and name.isprintable()) or " " in name:
                    raise TypeError(
                        f"{klass.__qualname__}.requested_macros[{stage.name}]: {name!r} is not "
                        f"a macro name (printable ASCII, no space: 'i', '{{auth_authen}}')")
                if name not in bucket:
                    bucket.append(name)
    return {stage: tuple(names) for stage, names in merged.items() if names}


_UNANSWERED = ("on_mail", "on_rcpt", "on_eoh")
"""Stages an on_message class collects without answering (when it does not override them):
MAIL and RCPT (nothing to answer before the headers), and end of headers (one round trip less
per message, as libmilter keeps it for a class without it). Header and body chunks are
answered: unanswered, the MTA streams them, and a client that waits for no reply got 0.46-0.77
times the msg/s of the hand-written filter (b774705)."""


def build_spec(cls: type[MilterSession]) -> ClassSpec:
    """Compute a session class's negotiation from its methods and class attributes."""
    stages = set()
    no_reply = set()
    protocol = ProtocolOpts.NONE
    whole = cls.on_message is not MilterSession.on_message
    for name, (off_flag, nr_flag) in STAGE_FLAGS.items():
        method = getattr(cls, name)
        if method is getattr(MilterSession, name):
            if whole and name in COLLECTS:  # collected for on_message
                stages.add(name)
                if name in _UNANSWERED:
                    no_reply.add(name)
                    protocol |= nr_flag
            else:
                protocol |= off_flag
            continue
        stages.add(name)
        if getattr(method, _NOREPLY_ATTR, False):
            no_reply.add(name)
            protocol |= nr_flag
    for name in OTHER_STAGES:
        method = getattr(cls, name)
        if method is not getattr(MilterSession, name):
            stages.add(name)
            if name == "on_negotiate" and inspect.iscoroutinefunction(method):
                raise TypeError(
                    f"{cls.__qualname__}.on_negotiate cannot be async: libmilter needs the "
                    f"negotiation before the connection goes on"
                )
            if getattr(method, _NOREPLY_ATTR, False):
                raise TypeError(
                    f"{cls.__qualname__}.{name}: @noreply is only for stages that answer the "
                    f"MTA before end-of-message, not {name}"
                )
    for klass in cls.__mro__:
        declared_actions = klass.__dict__.get("actions", Actions.NONE)
        if not isinstance(declared_actions, Actions) or int(declared_actions) & ~_ALL_ACTIONS:
            raise TypeError(
                f"{klass.__qualname__}.actions must combine Actions flags, "
                f"got {declared_actions!r}"
            )
        declared_protocol = klass.__dict__.get("protocol", ProtocolOpts.NONE)
        if not isinstance(declared_protocol, ProtocolOpts) or int(declared_protocol) & ~_ALL_OPTS:
            raise TypeError(
                f"{klass.__qualname__}.protocol must combine ProtocolOpts flags, "
                f"got {declared_protocol!r}"
            )
    actions = Actions(_union_over_mro(cls, "actions", Actions.NONE))
    extra = ProtocolOpts(_union_over_mro(cls, "protocol", ProtocolOpts.NONE))
    macros = _merge_macros(cls)
    if macros:
        actions |= Actions.SETSYMLIST
    if whole:
        stages.update(COLLECTS)
        protocol |= ProtocolOpts.HDR_LEADSPC
        limit = cls.max_message_size
        sized = limit is None or (type(limit) is int and limit > 0)
        if not sized or type(cls.too_big) is not Status or cls.too_big in _NOT_FINAL:
            raise TypeError(
                f"{cls.__qualname__}: max_message_size must be a number of bytes > 0 or None "
                f"({limit!r}), too_big a final Status ({cls.too_big!r})"
            )
    asynchronous = frozenset(
        name for name in stages if inspect.iscoroutinefunction(getattr(cls, name))
    )
    if "on_message" in asynchronous:
        asynchronous |= {"on_eom"}
    return ClassSpec(
        asynchronous=asynchronous,
        stages=frozenset(stages),
        noreply=frozenset(no_reply),
        actions=actions,
        protocol=protocol | extra,
        macros=macros,
    )


class MilterSession:
    """Base class of a filter: one instance per SMTP connection.

    Override the `on_*` stage methods you need; only those are negotiated with the MTA. Keep
    per-connection state in plain attributes: the instance is created at the connection's first
    callback and dropped after `on_close`.
    """

    actions: ClassVar[Actions] = Actions.NONE
    """Actions this class may perform; unioned with every base class's."""
    protocol: ClassVar[ProtocolOpts] = ProtocolOpts.NONE
    """Extra protocol options to request (SKIP, HDR_LEADSPC, RCPT_REJ, ...); unioned."""
    requested_macros: ClassVar[Mapping[Stage, Sequence[str]]] = {}
    """Macros to ask the MTA for at each stage (smfi_setsymlist); merged over the MRO."""
    max_message_size: ClassVar[int | None] = None
    """Bytes past which `on_message` does not get a message (None: no limit; `run` may set)."""
    too_big: ClassVar[Status] = Status.CONTINUE
    """The answer to a message past `max_message_size` (REJECT: 552 5.3.4)."""

    _pmk_spec: ClassVar[ClassSpec]
    _pmk_space: ClassVar[bytes] = b""  # b" ": HDR_LEADSPC implied by on_message, not asked for
    # Per-instance driver state, set by the runner or harness (class defaults: detached).
    _pmk_backend: SessionBackend | None = None
    _pmk_stage: str | None = None
    _pmk_actions: Actions = Actions.NONE
    _pmk_in_message: bool = False
    _pmk_id: int = 0  # the session's number in this process (its logs' session id)
    _pmk_pending: Any = None  # a suspended async stage still to be answered (runner: _Pending)
    _pmk_collected: Any = None  # on_message: the message being collected (`_whole`)
    _pmk_log: Any = None  # --record: this connection's recording, if it is sampled (`_record`)
    _pmk_modified: bool = False  # fail-open runs: on_eom sent a modification (`_dispatch`)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._pmk_spec = spec = build_spec(cls)
        asked = _union_over_mro(cls, "protocol", ProtocolOpts.NONE) & ProtocolOpts.HDR_LEADSPC
        cls._pmk_space = b" " if "on_message" in spec.stages and not asked else b""

    @classmethod
    def negotiation(cls) -> ClassSpec:
        """What this class negotiates: stages, no-reply stages, actions, options, macros."""
        return cls._pmk_spec

    # -- stage methods: the base versions are never registered with libmilter ---------------

    def on_negotiate(
        self, actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        """Choose actions and protocol options from what the MTA offers (xxfi_negotiate).

        The default asks for exactly what the class implies; an override may call `super()` and
        adjust. Return a status other than CONTINUE to refuse the connection.
        """
        spec = type(self)._pmk_spec
        return Status.CONTINUE, spec.actions, spec.negotiate(actions, opts)

    def on_connect(
        self, hostname: str, address: InetAddress | UnixAddress | None
    ) -> StageResult:
        """A client connected (xxfi_connect); `address` is None for an unknown family."""
        return Status.CONTINUE

    def on_helo(self, hostname: str) -> StageResult:
        """HELO/EHLO with the name the client gave (xxfi_helo)."""
        return Status.CONTINUE

    def on_mail(self, sender: str, params: EsmtpParams) -> StageResult:
        """MAIL FROM: a new message starts (xxfi_envfrom)."""
        return Status.CONTINUE

    def on_rcpt(self, recipient: str, params: EsmtpParams) -> StageResult:
        """RCPT TO, once per recipient; REJECT refuses only this recipient (xxfi_envrcpt)."""
        return Status.CONTINUE

    def on_data(self) -> StageResult:
        """The DATA command (xxfi_data)."""
        return Status.CONTINUE

    def on_unknown(self, command: str) -> StageResult:
        """An SMTP command the MTA does not know (xxfi_unknown)."""
        return Status.CONTINUE

    def on_header(self, name: str, value: str) -> StageResult:
        """One message header, in order (xxfi_header)."""
        return Status.CONTINUE

    def on_eoh(self) -> StageResult:
        """End of the headers (xxfi_eoh)."""
        return Status.CONTINUE

    def on_body(self, chunk: bytes) -> StageResult:
        """A piece of the body, called once per chunk (xxfi_body)."""
        return Status.CONTINUE

    def on_eom(self) -> StageResult:
        """End of message: the only stage where message actions are allowed (xxfi_eom)."""
        return Status.CONTINUE

    def on_message(self, message: Message) -> StageResult:
        """The whole message, at its end (sync or `async def`); edit `message.email` in place.

        Overriding it collects the message (headers with their exact leading space, body),
        spooled to a private temporary file past a threshold. It runs before `on_eom`, which
        runs only if it answered CONTINUE. When it returns CONTINUE or ACCEPT, the changes made
        to `message.email` become header actions and, if the body changed, `replace_body`.
        A message past `max_message_size` is not collected: the answer is `too_big`.
        """
        return Status.CONTINUE

    def on_abort(self) -> CleanupResult:
        """The current message was aborted; the connection goes on (xxfi_abort)."""

    def on_close(self) -> CleanupResult:
        """The connection is over: always the last call; then the instance is dropped."""

    # -- per-process hooks -------------------------------------------------------------------

    @classmethod
    def on_worker_start(cls) -> HookResult:
        """Once in every serving process, before its first session (sync or `async def`).

        The place for shared clients (an HTTP client, a resolver, a pool): an async one runs
        on the milter's event loop, where async stage methods run. With pre-forked workers it
        runs in each worker, after the fork. An exception stops start-up.
        """

    @classmethod
    def on_worker_stop(cls) -> HookResult:
        """Once in every serving process, after its last session (sync or `async def`)."""

    # -- session API -----------------------------------------------------------------------

    @functools.cached_property
    def log(self) -> SessionLog:
        """A logger (`pymilterkit.filter.<class name>`) whose records carry this session's id,
        queue id, stage, client address and worker PID, worked out only if a record is
        emitted; `--log-level` sets its level."""
        return session_log(self)

    def _pmk_eom(self, method: str) -> SessionBackend:
        if ABANDONED:
            _abandoned(method)
        if self._pmk_stage != "on_eom":
            where = f"in {self._pmk_stage}" if self._pmk_stage else "outside a callback"
            raise WrongStageError(
                f"{method}() is only allowed in on_eom, not {where}; "
                f"collect what you need and act in on_eom"
            )
        backend = self._pmk_backend
        assert backend is not None
        return backend

    def _pmk_action(self, flag: Actions, method: str) -> SessionBackend:
        # On the path of every message action: the common case is one test and no call.
        # int.__and__: IntFlag's own & builds a new flag object in Python (~0.5 us).
        if self._pmk_stage == "on_eom" and int.__and__(flag, self._pmk_actions) and not ABANDONED:
            return self._pmk_backend  # type: ignore[return-value]
        backend = self._pmk_eom(method)  # raises outside on_eom, or in an abandoned stage
        if int.__and__(flag, self._pmk_actions):
            return backend
        raise UndeclaredActionError(
            f"{method}() needs Actions.{flag.name} in the class's `actions` "
            f"(declared: {self._pmk_actions!r})"
        )

    def _pmk_any_stage(self, method: str) -> SessionBackend:
        backend = self._pmk_backend
        if backend is None or self._pmk_stage is None:
            raise WrongStageError(f"{method}() can only be called inside a stage method")
        if ABANDONED:
            _abandoned(method)
        return backend

    def macro(self, name: str) -> str | None:
        """The value of an MTA macro (`"i"` and `"{i}"` both work), or None (smfi_getsymval)."""
        raw = self._pmk_any_stage("macro").getsymval(v.macro_name(name))
        return None if raw is None else decode(raw)

    def set_reply(self, code: str, xcode: str | None = None, *lines: str) -> None:
        """Set the SMTP reply for a following REJECT/TEMPFAIL (smfi_setreply, smfi_setmlreply).

        `code` is 4xx or 5xx, `xcode` an enhanced code of the same class ("5.7.1"); each of up
        to 32 lines is sent as written (`%` needs no escaping).
        """
        raw = v.reply(code, xcode, lines)
        self._pmk_any_stage("set_reply").set_reply(*raw)

    def add_header(self, name: str | bytes, value: str | bytes) -> None:
        """Append a header to the message (smfi_addheader)."""
        space = self._pmk_space  # (put back before the value: counted in the packet's size)
        raw_name, raw_value = v.header(name, value, len(space))
        if (self._pmk_stage == "on_eom" and int.__and__(_ADD_HEADER, self._pmk_actions)
                and not ABANDONED):
            backend = self._pmk_backend  # `_pmk_action`'s test inline: most messages get one
        else:
            backend = self._pmk_action(_ADD_HEADER, "add_header")
        backend.add_header(raw_name, space + raw_value)  # type: ignore[union-attr]

    def insert_header(self, index: int, name: str | bytes, value: str | bytes) -> None:
        """Insert a header at 0-based position `index` of the MTA's headers (smfi_insheader).

        The MTA counts its own Received: header first, which the filter never sees: 0 puts
        the new header above it, 1 above the first header the filter saw (Postfix, Sendmail).
        """
        idx = v.index(index, 0, "header index")
        raw_name, raw_value = v.header(name, value, extra=4 + len(self._pmk_space))
        backend = self._pmk_action(_ADD_HEADER, "insert_header")
        backend.insert_header(idx, raw_name, self._pmk_space + raw_value)

    def change_header(
        self, name: str | bytes, value: str | bytes | None, index: int = 1
    ) -> None:
        """Change the `index`-th (1-based) header `name`; None deletes it (smfi_chgheader)."""
        idx = v.index(index, 1, "header index")
        if value is None:
            raw_name = v.header_name(name)
            v.check_size(len(raw_name) + 6, "header")
            self._pmk_action(_CHANGE_HEADER, "change_header").delete_header(raw_name, idx)
        else:
            raw_name, raw_value = v.header(name, value, extra=4 + len(self._pmk_space))
            if not raw_value and not self._pmk_space:
                raise InvalidArgumentError(
                    f"change_header({raw_name.decode('ascii')!r}, '') would delete the header "
                    "(the MTA reads an empty value so): pass None to delete it, or a value")
            backend = self._pmk_action(_CHANGE_HEADER, "change_header")
            backend.change_header(raw_name, idx, self._pmk_space + raw_value)

    def change_sender(self, sender: str | bytes, params: str | bytes | None = None) -> None:
        """Replace the envelope sender, optionally with ESMTP parameters (smfi_chgfrom)."""
        raw = v.address(sender, "sender")
        raw_params = v.esmtp_args(params, "sender parameters")
        v.check_size(len(raw) + len(raw_params or b"") + 2, "change_sender")
        self._pmk_action(_CHANGE_FROM, "change_sender").change_sender(raw, raw_params)

    def add_recipient(self, recipient: str | bytes, params: str | bytes | None = None) -> None:
        """Add an envelope recipient; with `params`, ESMTP args (smfi_addrcpt, smfi_addrcpt_par).

        Without params it needs `Actions.ADD_RCPT`; with params, `Actions.ADD_RCPT_PAR`.
        """
        raw = v.address(recipient, "recipient")
        raw_params = v.esmtp_args(params, "recipient parameters")
        v.check_size(len(raw) + len(raw_params or b"") + 2, "add_recipient")
        if raw_params is None:
            self._pmk_action(_ADD_RCPT, "add_recipient").add_recipient(raw)
        else:
            self._pmk_action(_ADD_RCPT_PAR, "add_recipient").add_recipient_par(raw, raw_params)

    def remove_recipient(self, recipient: str | bytes) -> None:
        """Remove an envelope recipient, written as it was given to on_rcpt (smfi_delrcpt)."""
        raw = v.address(recipient, "recipient")
        v.check_size(len(raw) + 1, "remove_recipient")
        self._pmk_action(_DELETE_RCPT, "remove_recipient").remove_recipient(raw)

    def replace_body(self, chunk: bytes) -> None:
        """Replace the body; the first call replaces, later calls append (smfi_replacebody)."""
        raw = v.body(chunk)
        self._pmk_action(_CHANGE_BODY, "replace_body").replace_body(raw)

    def progress(self) -> None:
        """Tell the MTA the filter is still working, restarting its timeout (smfi_progress)."""
        self._pmk_eom("progress").progress()

    def quarantine(self, reason: str) -> None:
        """Put the message on hold with a reason (smfi_quarantine)."""
        raw = v.text(reason, "quarantine reason")
        v.check_size(len(raw) + 1, "quarantine reason")
        self._pmk_action(_QUARANTINE, "quarantine").quarantine(raw)


MilterSession._pmk_spec = ClassSpec(
    stages=frozenset(),
    noreply=frozenset(),
    actions=Actions.NONE,
    protocol=NO_STAGE_MASK,
    macros={},
)
