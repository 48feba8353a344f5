"""MilterSession: negotiation computed from the class, and the session API's checks."""

from __future__ import annotations

from typing import Any

import pytest
from typing_extensions import override

from examples.rcpt_count import RcptCount
from pymilterkit import (
    Actions,
    InvalidArgumentError,
    MilterSession,
    ProtocolOpts,
    Stage,
    Status,
    UndeclaredActionError,
    WrongStageError,
    noreply,
)
from pymilterkit._dispatch import SessionRules
from pymilterkit._protocol import NO_STAGE_MASK, ActionBackend, ActionInfo
from tests.helpers import EVERY_ACTION

P = ProtocolOpts


class Recorder(ActionBackend):
    """A SessionBackend that records every call: the backend method and its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def getsymval(self, name: bytes) -> bytes | None:
        self.calls.append(("getsymval", name))
        return b"value-of-" + name

    def act(self, action: ActionInfo, *args: Any) -> None:
        self.calls.append((action.method, *(tuple(a) if isinstance(a, list) else a for a in args)))


def attach(session: MilterSession, stage: str | None = "on_eom") -> Recorder:
    backend = Recorder()
    driver = SessionRules(type(session), Status.TEMPFAIL)
    driver.attach(session, backend)
    driver.enter(session, stage)
    return backend


# -- negotiation from the class ------------------------------------------------------------


def test_only_overridden_stages_are_enabled() -> None:
    spec = RcptCount.negotiation()
    assert spec.stages == {"on_mail", "on_rcpt", "on_eom"}
    off = NO_STAGE_MASK & ~(P.NO_MAIL | P.NO_RCPT)
    assert spec.protocol == off
    assert spec.actions == Actions.ADD_HEADER
    assert spec.noreply == frozenset()


def test_base_class_negotiates_everything_away() -> None:
    assert MilterSession.negotiation().protocol == NO_STAGE_MASK
    assert MilterSession.negotiation().actions == Actions.NONE


class HeaderLogger(MilterSession):
    """A mixin: collects headers without answering, asks for the queue id."""

    actions = Actions.ADD_HEADER
    requested_macros = {Stage.EOM: ["i"], Stage.CONNECT: ["j"]}

    @noreply
    @override
    def on_header(self, name: str, value: str) -> Status:
        self.seen = getattr(self, "seen", 0) + 1
        return Status.CONTINUE


class Tagger(HeaderLogger):
    actions = Actions.CHANGE_HEADER
    protocol = ProtocolOpts.HDR_LEADSPC
    requested_macros = {Stage.EOM: ["{auth_authen}", "i"]}

    @override
    def on_eom(self) -> Status:
        return Status.CONTINUE


class Quarantiner(HeaderLogger):
    actions = Actions.QUARANTINE

    @override
    def on_body(self, chunk: bytes) -> Status:
        return Status.SKIP


def test_mixin_brings_its_needs_to_two_filters() -> None:
    tag, quar = Tagger.negotiation(), Quarantiner.negotiation()
    assert tag.actions == Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.SETSYMLIST
    assert quar.actions == Actions.ADD_HEADER | Actions.QUARANTINE | Actions.SETSYMLIST
    assert tag.noreply == quar.noreply == {"on_header"}
    assert tag.protocol == (NO_STAGE_MASK & ~P.NO_HDRS) | P.NR_HDR | P.HDR_LEADSPC
    assert quar.protocol == (NO_STAGE_MASK & ~(P.NO_HDRS | P.NO_BODY)) | P.NR_HDR
    assert tag.macros == {Stage.EOM: ("i", "{auth_authen}"), Stage.CONNECT: ("j",)}
    assert quar.macros == {Stage.EOM: ("i",), Stage.CONNECT: ("j",)}


def test_subclass_never_inherits_a_stale_mask() -> None:
    class Base(MilterSession):
        @override
        def on_helo(self, hostname: str) -> Status:
            return Status.CONTINUE

    before = Base.negotiation()

    class Child(Base):
        @override
        def on_connect(self, hostname: str, address: object) -> Status:
            return Status.CONTINUE

    assert Base.negotiation() is before
    assert Base.negotiation().stages == {"on_helo"}
    assert Child.negotiation().stages == {"on_helo", "on_connect"}
    assert not Child.negotiation().protocol & (P.NO_CONNECT | P.NO_HELO)


def test_skip_requested_only_with_a_body_stage_and_when_offered() -> None:
    everything = ProtocolOpts(0x1FFFFF)
    assert Quarantiner.negotiation().negotiate(Actions(0x1FF), everything) & P.SKIP
    assert not Quarantiner.negotiation().negotiate(Actions(0x1FF), P(0x7F)) & P.SKIP
    assert not RcptCount.negotiation().negotiate(Actions(0x1FF), everything) & P.SKIP


def test_no_bits_unknown_to_an_old_mta_are_not_requested() -> None:
    v2_offer = ProtocolOpts(0x7F)  # protocol 2: no NO_DATA / NO_UNKNOWN
    opts = RcptCount.negotiation().negotiate(Actions(0xF), v2_offer)
    assert not opts & (P.NO_DATA | P.NO_UNKNOWN)
    assert opts & P.NO_HELO


def test_noreply_on_eom_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="noreply"):

        class Bad(MilterSession):
            @noreply
            @override
            def on_eom(self) -> Status:
                return Status.CONTINUE


def test_requested_macros_are_checked() -> None:
    with pytest.raises(TypeError, match="Stage"):

        class Bad(MilterSession):
            requested_macros = {"eom": ["i"]}  # type: ignore[dict-item]

    with pytest.raises(TypeError, match="sequence"):

        class Bad2(MilterSession):
            requested_macros = {Stage.EOM: "i"}

    for name in ("{caf\u00e9}", "i j", "{i}\t", b"i"):  # every connection would fail, or split
        with pytest.raises(TypeError, match=r"is not a macro name|macro names are str"):
            type("Bad3", (MilterSession,), {"requested_macros": {Stage.EOM: [name]}})


def test_default_on_negotiate_asks_for_the_class_flags() -> None:
    status, actions, opts = RcptCount().on_negotiate(Actions(0x1FF), ProtocolOpts(0x1FFFFF))
    assert status is Status.CONTINUE
    assert actions == Actions.ADD_HEADER
    assert opts == RcptCount.negotiation().protocol


# -- session API ---------------------------------------------------------------------------


class AllActions(MilterSession):
    actions = EVERY_ACTION


def test_every_action_reaches_the_backend_as_bytes() -> None:
    s = AllActions()
    rec = attach(s)
    s.add_header("X-A", "1")
    s.insert_header(0, b"X-B", "2")
    s.change_header("Subject", "new", 2)
    s.change_header("X-Old", None)
    s.change_sender("<a@example.org>", "RET=HDRS")
    s.change_sender("b@example.org")
    s.add_recipient("c@example.com")
    s.add_recipient("d@example.com", "NOTIFY=NEVER")
    s.remove_recipient("<e@example.com>")
    s.replace_body(b"one\0")
    s.replace_body(b"two")
    s.progress()
    s.quarantine("looks odd")
    assert rec.calls == [
        ("add_header", b"X-A", b"1"),
        ("insert_header", 0, b"X-B", b"2"),
        ("change_header", b"Subject", 2, b"new"),
        ("delete_header", b"X-Old", 1),
        ("change_sender", b"<a@example.org>", b"RET=HDRS"),
        ("change_sender", b"b@example.org", None),
        ("add_recipient", b"c@example.com"),
        ("add_recipient_par", b"d@example.com", b"NOTIFY=NEVER"),
        ("remove_recipient", b"<e@example.com>"),
        ("replace_body", b"one\0"),
        ("replace_body", b"two"),
        ("progress",),
        ("quarantine", b"looks odd"),
    ]


def test_surrogateescaped_text_goes_back_as_the_original_bytes() -> None:
    s = AllActions()
    rec = attach(s)
    raw = b"caf\xe9 \xff"
    s.add_header("X-Raw", raw.decode("utf-8", "surrogateescape"))
    assert rec.calls == [("add_header", b"X-Raw", raw)]


@pytest.mark.parametrize("stage", ["on_connect", "on_helo", "on_rcpt", "on_header", "on_body"])
def test_actions_outside_eom_are_refused(stage: str) -> None:
    s = AllActions()
    rec = attach(s, stage)
    with pytest.raises(WrongStageError, match=f"only allowed in on_eom, not in {stage}"):
        s.add_header("X-A", "1")
    with pytest.raises(WrongStageError):
        s.progress()
    assert rec.calls == []


def test_actions_outside_any_callback_are_refused() -> None:
    s = AllActions()
    attach(s, None)
    with pytest.raises(WrongStageError, match="outside a callback"):
        s.quarantine("x")
    with pytest.raises(WrongStageError, match="inside a stage method"):
        s.macro("i")


@pytest.mark.parametrize(
    ("call", "flag"),
    [
        (lambda s: s.add_header("X", "1"), "ADD_HEADER"),
        (lambda s: s.insert_header(0, "X", "1"), "ADD_HEADER"),
        (lambda s: s.change_header("X", "1"), "CHANGE_HEADER"),
        (lambda s: s.change_sender("a@b"), "CHANGE_FROM"),
        (lambda s: s.add_recipient("a@b"), "ADD_RCPT"),
        (lambda s: s.add_recipient("a@b", "NOTIFY=NEVER"), "ADD_RCPT_PAR"),
        (lambda s: s.remove_recipient("a@b"), "DELETE_RCPT"),
        (lambda s: s.replace_body(b"x"), "CHANGE_BODY"),
        (lambda s: s.quarantine("x"), "QUARANTINE"),
    ],
)
def test_undeclared_actions_are_refused(call: Any, flag: str) -> None:
    s = RcptCount() if flag != "ADD_HEADER" else MilterSession()
    rec = attach(s)
    with pytest.raises(UndeclaredActionError, match=flag):
        call(s)
    assert rec.calls == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("", "x"),
        ("X Bad", "x"),
        ("X:Bad", "x"),
        ("X-Caf\u00e9", "x"),
        ("X-Nul\0", "x"),
        ("X-Ok", "line\nX-Injected: yes"),
        ("X-Ok", "line\r\nX-Injected: yes"),
        ("X-Ok", "bare\rcr"),
        ("X-Ok", "trailing\n"),
        ("X-Ok", "nul\0byte"),
        ("X-Ok", "x" * 65534),
    ],
)
def test_bad_headers_are_refused_before_libmilter(name: str, value: str) -> None:
    s = AllActions()
    rec = attach(s)
    with pytest.raises(InvalidArgumentError):
        s.add_header(name, value)
    with pytest.raises(InvalidArgumentError):
        s.change_header(name, value)
    assert rec.calls == []


def test_folded_header_values_are_accepted() -> None:
    s = AllActions()
    rec = attach(s)
    s.add_header("X-Folded", "first\n\tsecond\r\n third")
    assert rec.calls == [("add_header", b"X-Folded", b"first\n\tsecond\r\n third")]


class LeadingSpace(AllActions):
    """As an on_message class: HDR_LEADSPC, the space put back before each value."""


LeadingSpace._pmk_space = b" "  # (class creation computes it: set after)


def test_an_empty_change_header_value_is_refused_not_a_silent_delete() -> None:
    s = AllActions()
    rec = attach(s)
    with pytest.raises(InvalidArgumentError, match="pass None to delete"):
        s.change_header("X-A", "", 2)
    s.change_header("X-A", None, 2)
    assert rec.calls == [("delete_header", b"X-A", 2)]
    spaced = LeadingSpace()
    rec = attach(spaced)
    spaced.change_header("X-A", "", 2)  # sent as " ": nothing deleted
    assert rec.calls == [("change_header", b"X-A", 2, b" ")]


@pytest.mark.parametrize("call", ["add", "insert", "change"])
def test_the_leading_space_put_back_counts_in_the_size_limit(call: str) -> None:
    s = LeadingSpace()
    attach(s)

    def act(value: str) -> None:
        if call == "add":
            s.add_header("X-Big", value)
        elif call == "insert":
            s.insert_header(0, "X-Big", value)
        else:
            s.change_header("X-Big", value)

    extra = 0 if call == "add" else 4  # insert's and change's index
    value = "x" * (65535 - 2 - len("X-Big") - extra)  # one byte over with the space
    with pytest.raises(InvalidArgumentError, match="65536 bytes"):
        act(value)
    act(value[1:])


def test_header_index_checks() -> None:
    s = AllActions()
    attach(s)
    with pytest.raises(InvalidArgumentError):
        s.insert_header(-1, "X", "1")
    with pytest.raises(InvalidArgumentError):
        s.change_header("X", "1", 0)
    with pytest.raises(TypeError):
        s.change_header("X", "1", "2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.change_sender(""),
        lambda s: s.change_sender("a@b\r\nRCPT TO:<x>"),
        lambda s: s.change_sender("a@b", "RET=HDRS\n"),
        lambda s: s.add_recipient("a\0@b"),
        lambda s: s.remove_recipient("  "),
        lambda s: s.quarantine(""),
        lambda s: s.quarantine("two\nlines"),
        lambda s: s.add_recipient("x" * 70000),
    ],
)
def test_bad_envelope_arguments_are_refused(call: Any) -> None:
    s = AllActions()
    rec = attach(s)
    with pytest.raises(InvalidArgumentError):
        call(s)
    assert rec.calls == []


def test_replace_body_wants_bytes() -> None:
    s = AllActions()
    attach(s)
    with pytest.raises(TypeError, match="encode"):
        s.replace_body("text")  # type: ignore[arg-type]


def test_set_reply_single_and_multi_line_with_percent_escaped() -> None:
    s = MilterSession()
    rec = attach(s, "on_rcpt")
    s.set_reply("550", "5.7.1", "100% spam")
    s.set_reply("451")
    s.set_reply("550", None, "one", "two")
    assert rec.calls == [
        ("set_reply", b"550", b"5.7.1", (b"100%% spam",)),
        ("set_reply", b"451", None, ()),
        ("set_reply", b"550", None, (b"one", b"two")),
    ]


@pytest.mark.parametrize(
    ("code", "xcode", "lines"),
    [
        ("250", None, ()),
        ("55", None, ()),
        ("5500", None, ()),
        ("abc", None, ()),
        ("550", "4.7.1", ()),
        ("450", "5.7.1", ()),
        ("550", "5.7", ()),
        ("550", "5.7.1", ("a\r\nb",)),
        ("550", "5.7.1", ("nul\0",)),
        ("550", "5.7.1", tuple(["x"] * 33)),
        ("550", "5.7.1", ("%" * 491,)),
    ],
)
def test_bad_replies_are_refused(code: str, xcode: str | None, lines: tuple[str, ...]) -> None:
    s = MilterSession()
    rec = attach(s, "on_connect")
    with pytest.raises(InvalidArgumentError):
        s.set_reply(code, xcode, *lines)
    assert rec.calls == []


def test_thirty_two_lines_are_fine() -> None:
    s = MilterSession()
    rec = attach(s, "on_connect")
    s.set_reply("421", "4.3.2", *[f"line {i}" for i in range(32)])
    assert len(rec.calls[0][3]) == 32


def test_macro_lookup() -> None:
    s = MilterSession()
    rec = attach(s, "on_mail")
    assert s.macro("{auth_authen}") == "value-of-{auth_authen}"
    assert rec.calls == [("getsymval", b"{auth_authen}")]


def test_stray_flags_in_actions_or_protocol_are_refused() -> None:
    with pytest.raises(TypeError, match="Actions"):

        class Bad(MilterSession):
            actions = Actions.ADD_HEADER | ProtocolOpts.SKIP  # noqa: RUF100

    with pytest.raises(TypeError, match="ProtocolOpts"):

        class Bad2(MilterSession):
            protocol = Actions.ADD_HEADER  # type: ignore[assignment]
