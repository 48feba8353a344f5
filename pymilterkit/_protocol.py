"""The milter protocol's vocabulary, each piece once: the stage and action tables, constants.

Every other table of stages (the session's negotiation flags and masks, the C-callback
adapter's callback fields, the harness's wire commands, flags and macro stages, the metrics'
stage labels) is derived from `STAGES`; every action backend (libmilter's, the counting, dry-run
and locked ones, the harness's) from `ACTIONS`; every protocol constant used in more than one
place lives here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from ._flags import Actions, ProtocolOpts, Stage, Status

__all__ = [
    "ACTION",
    "ACTIONS",
    "ALL_ACTIONS",
    "ALL_LIBMILTER_OPTS",
    "ALL_PROTOCOL",
    "BY_METHOD",
    "ENDS_MESSAGE",
    "MI_FAILURE",
    "MI_SUCCESS",
    "NOREPLY_MASK",
    "NO_STAGE_MASK",
    "PROTOCOL_VERSION",
    "REPLYCODE",
    "REPLY_CLASS",
    "REPLY_LETTER",
    "STAGES",
    "STAGE_METHODS",
    "ActionBackend",
    "ActionInfo",
    "BackendWrapper",
    "SessionBackend",
    "StageInfo",
]

PROTOCOL_VERSION = 6
"""The milter protocol version libmilter 8.14+ and Postfix 2.6+ speak."""
MI_SUCCESS = 0
MI_FAILURE = -1
"""libmilter's return codes of smfi_* calls."""

ALL_ACTIONS = Actions(0x1FF)
"""Every action (SMFIF_*), as Postfix 3.7 offers."""
ALL_PROTOCOL = ProtocolOpts(0x1FFFFF)
"""Every protocol step option of version 6, as Postfix 3.7 offers."""
ALL_LIBMILTER_OPTS = 0x301FFFFF
"""Every protocol option bit libmilter knows (including the SMFIP_MDS_* sizes)."""

ENDS_MESSAGE = frozenset((Status.REJECT, Status.DISCARD, Status.ACCEPT, Status.TEMPFAIL))
"""Answers that end the message (at RCPT they refuse only that recipient)."""

# MTA -> milter commands (SMFIC_*) that are not stages
ABORT, MACRO, OPTNEG, QUIT, QUIT_NC = b"A", b"D", b"O", b"Q", b"K"


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """One stage of the protocol, as every part of pymilterkit names it."""

    method: str
    """The `MilterSession` method (`on_rcpt`)."""
    step: str
    """The conversation step in the testing kit (`testing.Step` value: "rcpt")."""
    command: bytes
    """The MTA's command letter on the wire (SMFIC_*)."""
    callback: str
    """The libmilter `smfiDesc` field (`xxfi_envrcpt`)."""
    off: ProtocolOpts
    """The NO_* flag that switches the stage off (NONE: it cannot be)."""
    noreply: ProtocolOpts
    """The NR_* flag that makes the stage unanswered (NONE: it cannot be)."""
    macros: Stage | None
    """Where macros requested for this stage are sent (SMFIM_*), if anywhere."""
    connection: bool
    """A connection-level stage: it is not part of a message (no abort follows it)."""
    shape: str
    """The C type of its libmilter callback (`_libmilter.Callbacks.make`: "argv")."""
    state: int
    """libmilter's engine state while it runs (engine.c's ST_*)."""


_P = ProtocolOpts
STAGES: tuple[StageInfo, ...] = (
    StageInfo("on_connect", "connect", b"C", "xxfi_connect", _P.NO_CONNECT, _P.NR_CONN,
              Stage.CONNECT, True, "connect", 2),
    StageInfo("on_helo", "helo", b"H", "xxfi_helo", _P.NO_HELO, _P.NR_HELO, Stage.HELO, True,
              "str1", 3),
    StageInfo("on_mail", "mail", b"M", "xxfi_envfrom", _P.NO_MAIL, _P.NR_MAIL,
              Stage.ENVFROM, False, "argv", 4),
    StageInfo("on_rcpt", "rcpt", b"R", "xxfi_envrcpt", _P.NO_RCPT, _P.NR_RCPT,
              Stage.ENVRCPT, False, "argv", 5),
    StageInfo("on_data", "data", b"T", "xxfi_data", _P.NO_DATA, _P.NR_DATA, Stage.DATA, False,
              "ctx", 6),
    StageInfo("on_unknown", "unknown", b"U", "xxfi_unknown", _P.NO_UNKNOWN, _P.NR_UNKN,
              None, True, "ptr1", 13),
    StageInfo("on_header", "header", b"L", "xxfi_header", _P.NO_HDRS, _P.NR_HDR, None, False,
              "str2", 7),
    StageInfo("on_eoh", "eoh", b"N", "xxfi_eoh", _P.NO_EOH, _P.NR_EOH, Stage.EOH, False,
              "ctx", 8),
    StageInfo("on_body", "body", b"B", "xxfi_body", _P.NO_BODY, _P.NR_BODY, None, False,
              "body", 9),
    StageInfo("on_eom", "eom", b"E", "xxfi_eom", _P.NONE, _P.NONE, Stage.EOM, False, "ctx", 10),
)
"""The stages with a command from the MTA, in protocol order; on_abort, on_close and
on_negotiate are the other stage methods (no answer, or answered by negotiation)."""

BY_METHOD = {info.method: info for info in STAGES}
"""`STAGES` by method name."""

STAGE_METHODS: tuple[str, ...] = (
    *(info.method for info in STAGES), "on_negotiate", "on_abort", "on_close"
)
"""Every stage method of a session class."""

NO_STAGE_MASK = ProtocolOpts(sum(int(info.off) for info in STAGES))
"""Every NO_* bit that switches a stage off."""
NOREPLY_MASK = ProtocolOpts(sum(int(info.noreply) for info in STAGES))
"""Every NR_* bit."""

REPLY_CLASS: dict[int, bytes] = {Status.REJECT: b"5", Status.TEMPFAIL: b"4"}
"""The statuses a `set_reply` text goes with, and the first digit its code must have."""
REPLY_LETTER: dict[int, bytes] = {
    Status.CONTINUE: b"c", Status.REJECT: b"r", Status.DISCARD: b"d", Status.ACCEPT: b"a",
    Status.TEMPFAIL: b"t", Status.SKIP: b"s",
}
"""The milter's reply command (SMFIR_*) for each status that has one (engine.c's sendreply);
REJECT or TEMPFAIL with a `set_reply` text of its class goes as `REPLYCODE` with the text."""
REPLYCODE = b"y"


@dataclasses.dataclass(frozen=True, slots=True)
class ActionInfo:
    """One action a session can ask of the MTA, as every backend names it."""

    method: str
    """The backend method (`SessionBackend.add_header`): one per row."""
    label: str
    """The session API call and the metrics' `action` label (`add_header`)."""
    function: str
    """The libmilter function that carries it out (`smfi_addheader`)."""
    flag: Actions
    """The `Actions` flag the class must declare (NONE: none)."""
    eom_only: bool
    """Allowed only in on_eom (else in any stage method)."""
    command: bytes
    """The milter's command on the wire (SMFIR_*)."""
    shows: str
    """How a log shows its arguments (`str.format`, each argument as text)."""


_A = Actions
ACTIONS: tuple[ActionInfo, ...] = (
    ActionInfo("add_header", "add_header", "smfi_addheader", _A.ADD_HEADER, True, b"h",
               "{0}: {1}"),
    ActionInfo("insert_header", "insert_header", "smfi_insheader", _A.ADD_HEADER, True, b"i",
               "#{0} {1}: {2}"),
    ActionInfo("change_header", "change_header", "smfi_chgheader", _A.CHANGE_HEADER, True, b"m",
               "{0} #{1}: {2}"),
    ActionInfo("delete_header", "delete_header", "smfi_chgheader", _A.CHANGE_HEADER, True, b"m",
               "{0} #{1}"),
    ActionInfo("change_sender", "change_sender", "smfi_chgfrom", _A.CHANGE_FROM, True, b"e",
               "{0} {1}"),
    ActionInfo("add_recipient", "add_recipient", "smfi_addrcpt", _A.ADD_RCPT, True, b"+", "{0}"),
    ActionInfo("add_recipient_par", "add_recipient", "smfi_addrcpt_par", _A.ADD_RCPT_PAR, True,
               b"2", "{0} {1}"),
    ActionInfo("remove_recipient", "remove_recipient", "smfi_delrcpt", _A.DELETE_RCPT, True,
               b"-", "{0}"),
    ActionInfo("replace_body", "replace_body", "smfi_replacebody", _A.CHANGE_BODY, True, b"b",
               "({0} bytes)"),
    ActionInfo("quarantine", "quarantine", "smfi_quarantine", _A.QUARANTINE, True, b"q", "{0}"),
    ActionInfo("progress", "progress", "smfi_progress", _A.NONE, True, b"p", ""),
    ActionInfo("set_reply", "set_reply", "smfi_setreply", _A.NONE, False, b"y", "{0} {1} {2}"),
)
"""Every action, one row per backend method; `macro` (smfi_getsymval) reads, so is not one."""

ACTION = {info.method: info for info in ACTIONS}
"""`ACTIONS` by backend method."""


class SessionBackend(Protocol):
    """Carries out session actions: one method per row of `_protocol.ACTIONS`, plus macro reads.

    `ActionBackend` makes one from a single `act` method; libmilter's (`_trampolines`) and the
    harness's call their functions, the counting, dry-run, locked and refusing backends wrap
    another (`BackendWrapper`).
    """

    def getsymval(self, name: bytes) -> bytes | None: ...
    def add_header(self, name: bytes, value: bytes) -> None: ...
    def insert_header(self, index: int, name: bytes, value: bytes) -> None: ...
    def change_header(self, name: bytes, index: int, value: bytes) -> None: ...
    def delete_header(self, name: bytes, index: int) -> None: ...
    def change_sender(self, sender: bytes, params: bytes | None) -> None: ...
    def add_recipient(self, recipient: bytes) -> None: ...
    def add_recipient_par(self, recipient: bytes, params: bytes) -> None: ...
    def remove_recipient(self, recipient: bytes) -> None: ...
    def replace_body(self, chunk: bytes) -> None: ...
    def quarantine(self, reason: bytes) -> None: ...
    def progress(self) -> None: ...
    def set_reply(self, code: bytes, xcode: bytes | None, lines: Sequence[bytes]) -> None: ...


class ActionBackend:
    """A `SessionBackend` whose every action is `act(action, *args)` with its row of the table.

    The only place that says which backend method is which action: a backend written as one
    `act` follows the table (`ActionInfo`: label, libmilter function, flag, wire command).
    """

    __slots__ = ()

    def act(self, action: ActionInfo, *args: Any) -> None:
        raise NotImplementedError

    def getsymval(self, name: bytes) -> bytes | None:
        raise NotImplementedError

    def add_header(self, name: bytes, value: bytes) -> None:
        self.act(ACTION["add_header"], name, value)

    def insert_header(self, index: int, name: bytes, value: bytes) -> None:
        self.act(ACTION["insert_header"], index, name, value)

    def change_header(self, name: bytes, index: int, value: bytes) -> None:
        self.act(ACTION["change_header"], name, index, value)

    def delete_header(self, name: bytes, index: int) -> None:
        self.act(ACTION["delete_header"], name, index)

    def change_sender(self, sender: bytes, params: bytes | None) -> None:
        self.act(ACTION["change_sender"], sender, params)

    def add_recipient(self, recipient: bytes) -> None:
        self.act(ACTION["add_recipient"], recipient)

    def add_recipient_par(self, recipient: bytes, params: bytes) -> None:
        self.act(ACTION["add_recipient_par"], recipient, params)

    def remove_recipient(self, recipient: bytes) -> None:
        self.act(ACTION["remove_recipient"], recipient)

    def replace_body(self, chunk: bytes) -> None:
        self.act(ACTION["replace_body"], chunk)

    def quarantine(self, reason: bytes) -> None:
        self.act(ACTION["quarantine"], reason)

    def progress(self) -> None:
        self.act(ACTION["progress"])

    def set_reply(self, code: bytes, xcode: bytes | None, lines: Sequence[bytes]) -> None:
        self.act(ACTION["set_reply"], code, xcode, lines)


class BackendWrapper(ActionBackend):
    """A backend around `inner`: each action goes through `act`, which by default carries it
    out (`perform`); macro reads go straight through."""

    __slots__ = ("inner",)

    def __init__(self, inner: SessionBackend) -> None:
        self.inner = inner

    def perform(self, action: ActionInfo, *args: Any) -> None:
        """Carry `action` out on the inner backend."""
        getattr(self.inner, action.method)(*args)

    def act(self, action: ActionInfo, *args: Any) -> None:
        self.perform(action, *args)

    def getsymval(self, name: bytes) -> bytes | None:
        return self.inner.getsymval(name)
