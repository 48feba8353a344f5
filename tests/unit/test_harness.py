"""The in-process harness: stage order, negotiation, verdicts, error policy, results."""

from __future__ import annotations

import email.message
import logging
from ipaddress import IPv4Address

import pytest
from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    MilterSession,
    ProtocolOpts,
    Stage,
    Status,
    UndeclaredActionError,
    UnixAddress,
    WrongStageError,
    noreply,
)
from pymilterkit.testing import (
    ClientInfo,
    Envelope,
    Harness,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    MessageResult,
    MilterTimeout,
    Progress,
    Recipient,
    RecipientAdded,
    RecipientRemoved,
    SenderChanged,
    Step,
    apply_envelope,
    apply_modifications,
)
from tests.integration.filters import HeadersBodyAndRcpt

MESSAGE = b"From: a@example.net\r\nSubject: hi\r\n there\r\nTo: b@example.org\r\n\r\nline 1\r\n"


class Log(MilterSession):
    """Records every call with its arguments, reports them at end of message."""

    actions = Actions.ADD_HEADER
    calls: list[str]

    def _log(self, text: str) -> Status:
        if not hasattr(self, "calls"):
            self.calls = []
        self.calls.append(text)
        return Status.CONTINUE

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        return self._log(f"connect {hostname} {address}")

    @override
    def on_helo(self, hostname: str) -> Status:
        return self._log(f"helo {hostname}")

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return self._log(f"mail {sender} {dict(params)}")

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return self._log(f"rcpt {recipient} {params!s}")

    @override
    def on_data(self) -> Status:
        return self._log("data")

    @override
    def on_header(self, name: str, value: str) -> Status:
        return self._log(f"header {name}={value!r}")

    @override
    def on_eoh(self) -> Status:
        return self._log("eoh")

    @override
    def on_body(self, chunk: bytes) -> Status:
        return self._log(f"body {len(chunk)}")

    @override
    def on_eom(self) -> Status:
        self._log("eom")
        self.add_header("X-Calls", " | ".join(self.calls))
        return Status.CONTINUE


def calls(result_header: str | None) -> list[str]:
    assert result_header is not None
    return result_header.split(" | ")


def test_stages_run_in_libmilter_order_with_postfix_style_values() -> None:
    body = b"x" * 70000 + b"\r\n"
    result = Harness(Log).run(
        MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body,
        sender="a@example.net",
        sender_params="SIZE=100 BODY=8BITMIME",
        recipients=[Recipient("b@example.org", "NOTIFY=NEVER")],
    )
    assert calls(result.header("X-Calls")) == [
        "connect mail.example.net 192.0.2.10:41234",
        "helo mail.example.net",
        "mail <a@example.net> {'SIZE': '100', 'BODY': '8BITMIME'}",
        "rcpt <b@example.org> NOTIFY=NEVER",
        "data",
        "header From='a@example.net'",
        "header Subject='hi\\n there'",
        "header To='b@example.org'",
        "eoh",
        "body 65535",
        "body 4467",
        "eom",
    ]
    assert result.status is Status.CONTINUE and result.stage is Step.EOM


def test_email_message_input_and_str_input() -> None:
    msg = email.message.EmailMessage()
    msg["Subject"] = "from an EmailMessage"
    msg.set_content("hello\n")
    result = Harness(Log).run(msg)
    seen = calls(result.header("X-Calls"))
    assert "header Subject='from an EmailMessage'" in seen
    assert Harness(Log).run("Subject: text\n\nbody\n").header("X-Calls") is not None


class OnlyEom(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Only", "eom")
        return Status.CONTINUE


def test_stages_not_overridden_are_not_sent() -> None:
    conn = Harness(OnlyEom).run_connection([MESSAGE])
    assert conn.connect is None and conn.helo is None
    (msg,) = conn.messages
    assert [a.step for a in msg.answers] == [Step.EOM]
    assert conn.negotiation.protocol & ProtocolOpts.NO_MAIL
    assert conn.negotiation.actions == Actions.ADD_HEADER


class RejectBad(MilterSession):
    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if "bad" in recipient:
            self.set_reply("550", "5.1.1", "no such user")
            return Status.REJECT
        return Status.CONTINUE


def test_reject_at_rcpt_refuses_only_that_recipient() -> None:
    result = Harness(RejectBad).run(MESSAGE, recipients=["ok@x", "bad@x", "ok2@x"])
    assert result.status is Status.CONTINUE
    assert [r.accepted for r in result.recipients] == [True, False, True]
    bad = result.recipients[1].reply
    assert bad is not None and str(bad) == "550 5.1.1 no such user"
    everyone_bad = Harness(RejectBad).run(MESSAGE, recipients=["bad1@x", "bad2@x"])
    assert everyone_bad.status is Status.REJECT and everyone_bad.stage is Step.RCPT
    assert not everyone_bad.delivered


class AcceptAtConnect(MilterSession):
    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        return Status.ACCEPT if hostname == "trusted" else Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return Status.DISCARD


def test_connection_level_verdicts_apply_to_every_message() -> None:
    harness = Harness(AcceptAtConnect)
    trusted = harness.run_connection([MESSAGE, MESSAGE], client=ClientInfo(hostname="trusted"))
    assert [(m.status, m.stage) for m in trusted.messages] == [(Status.ACCEPT, Step.CONNECT)] * 2
    other = harness.run_connection([MESSAGE], client=ClientInfo(hostname="other"))
    assert (other.messages[0].status, other.messages[0].stage) == (Status.DISCARD, Step.MAIL)


class Collector(MilterSession):
    actions = Actions.ADD_HEADER

    @noreply
    @override
    def on_header(self, name: str, value: str) -> Status:
        self.names = [*getattr(self, "names", []), name]
        return Status.NOREPLY

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Names", ",".join(self.names))
        return Status.CONTINUE


def test_noreply_stages_are_not_waited_for() -> None:
    conn = Harness(Collector).run_connection([MESSAGE])
    assert conn.negotiation.protocol & ProtocolOpts.NR_HDR
    msg = conn.messages[0]
    assert {a.status for a in msg.answers if a.step is Step.HEADER} == {Status.NOREPLY}
    assert msg.header("X-Names") == "From,Subject,To"


class Broken(MilterSession):
    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        raise RuntimeError("bug")


def test_errors_follow_the_runner_policy(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="pymilterkit"):
        conn = Harness(Broken).run_connection([MESSAGE])
    assert conn.messages[0].status is Status.TEMPFAIL
    assert [(stage, type(exc)) for stage, exc in conn.errors] == [("on_mail", RuntimeError)]
    assert "Broken.on_mail raised RuntimeError; answering TEMPFAIL" in caplog.text
    assert Harness(Broken, error_status=Status.CONTINUE).run(MESSAGE).status is Status.CONTINUE
    with pytest.raises(RuntimeError, match="bug"):
        Harness(Broken, reraise=True).run(MESSAGE)


def test_an_error_in_a_stage_without_an_answer_does_not_claim_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Careless(MilterSession):
        @noreply
        @override
        def on_header(self, name: str, value: str) -> Status:
            raise RuntimeError("bug")

        @override
        def on_abort(self) -> None:
            raise RuntimeError("bug")

        @override
        def on_close(self) -> None:
            raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR, logger="pymilterkit"):
        conn = Harness(Careless).open()
        conn.negotiate()
        conn.connect("h", None)
        conn.mail("<a@x>")
        conn.rcpt("<b@x>")
        conn.header("Subject", " x")
        conn.abort()
        conn.quit()
    assert "Careless.on_header raised RuntimeError; not answered (@noreply)" in caplog.text
    assert "Careless.on_abort raised RuntimeError; nothing to answer" in caplog.text
    assert "Careless.on_close raised RuntimeError; nothing to answer" in caplog.text
    assert "answering TEMPFAIL" not in caplog.text


class Misbehaving(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        if "early" in sender:
            self.add_header("X-Too", "early")
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.change_header("Subject", "x")  # CHANGE_HEADER not declared
        return Status.CONTINUE


def test_session_api_checks_hold_in_the_harness() -> None:
    with pytest.raises(WrongStageError):
        Harness(Misbehaving, reraise=True).run(MESSAGE, sender="early@x")
    with pytest.raises(UndeclaredActionError):
        Harness(Misbehaving, reraise=True).run(MESSAGE, sender="late@x")


class Editor(MilterSession):
    actions = (Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.CHANGE_BODY
               | Actions.CHANGE_FROM | Actions.ADD_RCPT | Actions.ADD_RCPT_PAR
               | Actions.DELETE_RCPT | Actions.QUARANTINE)

    @override
    def on_eom(self) -> Status:
        self.insert_header(0, "X-First", "top")
        self.add_header("X-Last", "folded\n\tvalue")
        self.change_header("Subject", "new subject")
        self.change_header("To", None)
        self.change_sender("<new@example.net>", "RET=FULL")
        self.add_recipient("<extra@example.org>", "NOTIFY=NEVER")
        self.add_recipient("<plain@example.org>")
        self.remove_recipient("<b@example.org>")
        self.replace_body(b"replaced\r\n")
        self.quarantine("suspicious")
        self.progress()
        return Status.CONTINUE


def test_modifications_are_typed_and_apply_to_the_message() -> None:
    result = Harness(Editor).run(MESSAGE, recipients=["b@example.org", "c@example.org"])
    assert result.modifications == (
        HeaderInserted(0, "X-First", "top"),
        HeaderAdded("X-Last", "folded\n\tvalue"),
        HeaderChanged("Subject", 1, "new subject"),
        HeaderDeleted("To", 1),
        SenderChanged("<new@example.net>", "RET=FULL"),
        RecipientAdded("<extra@example.org>", "NOTIFY=NEVER"),
        RecipientAdded("<plain@example.org>", None),
        RecipientRemoved("<b@example.org>"),
        *result.modifications[8:9],
        *result.modifications[9:10],
        Progress(),
    )
    assert result.new_body == b"replaced\r\n"
    assert result.quarantine_reason == "suspicious"
    assert result.progress_count == 1
    delivered = apply_modifications(MESSAGE, result)
    assert delivered == (
        b"X-First: top\r\nFrom: a@example.net\r\nSubject: new subject\r\n"
        b"X-Last: folded\r\n\tvalue\r\n\r\nreplaced\r\n"
    )
    envelope = apply_envelope(Envelope.of("a@example.net", ["b@example.org", "c@example.org"]),
                              result)
    assert envelope.sender == "new@example.net" and envelope.sender_params == "RET=FULL"
    assert [r.address for r in envelope.recipients] == [
        "c@example.org", "extra@example.org", "plain@example.org"]


def test_insert_indexes_count_the_mtas_own_received_header_first() -> None:
    # Postfix (cleanup_milter.c) and Sendmail hold their own Received: first, unseen by the
    # filter: an insert at 0 goes above it, at 1 above the first header the filter saw;
    # change and delete indexes do not count it.
    raw = b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody\r\n"
    mods = (HeaderInserted(2, "X-2", "v"), HeaderInserted(0, "X-0", "v"),
            HeaderInserted(1, "X-1", "v"), HeaderChanged("B", 1, "changed"),
            HeaderInserted(99, "X-99", "v"))
    result = MessageResult(Status.CONTINUE, Step.EOM, None, mods, (), ())
    names = [line.split(b":")[0] for line in apply_modifications(raw, result).split(b"\r\n")]
    # X-2 goes after A (Received:, A, X-2); X-0 above Received:; X-1 at 1 is then under X-0,
    # still above Received:, as Postfix places them; X-99 past the end is appended.
    assert names[:7] == [b"X-0", b"X-1", b"A", b"X-2", b"B", b"C", b"X-99"]
    assert b"B: changed" in apply_modifications(raw, result)


def test_apply_keeps_lf_messages_lf_and_ignores_refused_messages() -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    result = Harness(Editor).run(lf)
    assert b"\r" not in apply_modifications(lf, result)
    refused = Harness(RejectBad).run(MESSAGE, recipients=["bad@x"])
    assert apply_modifications(MESSAGE, refused) == MESSAGE


class Aborts(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.aborts = 0
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Aborts", str(self.aborts))
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self.aborts += 1


def test_abort_after_a_finished_message_does_not_call_on_abort_but_rset_does() -> None:
    conn = Harness(Aborts).run_connection([MESSAGE, MESSAGE])
    assert [m.header("X-Aborts") for m in conn.messages] == ["0", "0"]
    low = Harness(Aborts).open()
    low.negotiate()
    low.connect("h", None)
    low.mail("<a@x>")
    low.rcpt("<b@x>")
    low.abort()
    low.mail("<a@x>")
    # libmilter ignores an end of message straight after MAIL (no RCPT): it would not answer.
    low.rcpt("<b@x>")
    eom = low.eom()
    assert eom.modifications == (HeaderAdded("X-Aborts", "1"),)
    low.quit()


class FailsFirst(Aborts):
    """Aborts whose first message fails at `where`: an exception, or a result no Status."""

    where = "on_eom"
    failed = False

    def fail_once(self, stage: str) -> Status:
        if stage == self.where and not self.failed:
            self.failed = True
            if self.where == "on_header":
                return "garbage"  # type: ignore[return-value]
            raise RuntimeError("boom")
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        return self.fail_once("on_header")

    @override
    def on_eom(self) -> Status:
        self.fail_once("on_eom")
        return super().on_eom()


class FailsFirstAsync(FailsFirst):
    @override
    async def on_eom(self) -> Status:  # type: ignore[override]
        self.fail_once("on_eom")
        self.add_header("X-Aborts", str(self.aborts))
        return Status.CONTINUE


@pytest.mark.parametrize("where", ["on_eom", "on_header", "async on_eom"])
def test_a_message_ended_by_the_error_status_is_not_aborted_again(where: str) -> None:
    # The answer sent (the error status) ended the message: the MTA's abort after it is not
    # the message's abort (as after a returned TEMPFAIL).
    base = FailsFirstAsync if where.startswith("async") else FailsFirst
    cls = type("Fails", (base,), {"where": where.split()[-1]})
    conn = Harness(cls).run_connection([MESSAGE, MESSAGE])
    assert [m.status for m in conn.messages] == [Status.TEMPFAIL, Status.CONTINUE]
    assert conn.messages[1].header("X-Aborts") == "0"


def test_a_noreply_stage_refusing_does_not_end_the_message() -> None:
    class Ignored(Aborts):
        @noreply
        @override
        def on_header(self, name: str, value: str) -> Status:
            return Status.REJECT  # not sent: the MTA goes on

    conn = Harness(Ignored).open()
    conn.negotiate()
    conn.connect("h", None)
    conn.mail("<a@x>")
    conn.rcpt("<b@x>")
    conn.header("Subject", " x")
    conn.abort()  # the client went away mid-message
    conn.mail("<a@x>")
    conn.rcpt("<b@x>")
    assert conn.eom().modifications == (HeaderAdded("X-Aborts", "1"),)
    conn.quit()


class WantsMacros(MilterSession):
    actions = Actions.ADD_HEADER
    requested_macros = {Stage.CONNECT: ["{client_addr}"], Stage.EOM: ["i"]}

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Macros", f"{self.macro('client_addr')} {self.macro('{i}')} "
                                    f"{self.macro('j')}")
        return Status.CONTINUE


def test_requested_macros_only_are_sent() -> None:
    client = ClientInfo(macros={"connect": {"client_addr": "192.0.2.10"}})
    conn = Harness(WantsMacros, client=client).run_connection(
        [(Envelope(queue_id="4QID"), MESSAGE)]
    )
    assert conn.negotiation.macros == {Stage.CONNECT: ("{client_addr}",), Stage.EOM: ("i",)}
    assert conn.messages[0].header("X-Macros") == "None 4QID None"
    # {client_addr} has no braces-free alias; the full name works:
    assert Harness(WantsMacros, client=client).run(MESSAGE).header("X-Macros") is not None


class UnixClient(MilterSession):
    actions = Actions.ADD_HEADER

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.address = address
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Address", repr(self.address))
        return Status.CONTINUE


@pytest.mark.parametrize(
    "address",
    [InetAddress(IPv4Address("203.0.113.5"), 2525), UnixAddress("/tmp/c.sock"), None],
)
def test_client_addresses_of_every_family(address: InetAddress | UnixAddress | None) -> None:
    result = Harness(UnixClient, client=ClientInfo(address=address)).run(MESSAGE)
    assert result.header("X-Address") == repr(address)


class SilentNoReply(MilterSession):
    """Marks on_mail @noreply but negotiates the NR flag away: libmilter then says nothing."""

    @noreply
    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return Status.NOREPLY

    @override
    def on_negotiate(
        self, actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        status, acts, requested = super().on_negotiate(actions, opts)
        return status, acts, requested & ~ProtocolOpts.NR_MAIL


def test_a_stage_libmilter_would_not_answer_times_out() -> None:
    with pytest.raises(MilterTimeout, match="no answer to mail"):
        Harness(SilentNoReply).run(MESSAGE)


def test_harness_refuses_non_session_classes() -> None:
    with pytest.raises(TypeError):
        Harness(object)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "shape"),
    [(b"just a body\r\n", "0 13"), (b"", "0 0"), (b"\r\nbody only\r\n", "0 11"),
     (b"Subject: x\r\n", "1 0")],
)
def test_after_data_a_message_without_headers_is_answered(message: bytes, shape: str) -> None:
    # On TCP the MTA sends DATA; libmilter reaches the body from DATA only past a header or
    # end of headers, so end of headers is negotiated (without an answer) for such a filter.
    result = Harness(HeadersBodyAndRcpt, tcp=True).run_connection([message])
    assert result.negotiation.protocol & ProtocolOpts.NR_EOH
    assert not result.negotiation.protocol & (ProtocolOpts.NO_EOH | ProtocolOpts.NO_DATA)
    (msg,) = result.messages
    assert msg.status is Status.CONTINUE and msg.header("X-Shape") == shape
    eoh = [a for a in msg.answers if a.step is Step.EOH]
    assert [a.status for a in eoh] == [Status.NOREPLY]


def test_end_of_headers_stays_off_when_the_mta_sends_no_data() -> None:
    result = Harness(HeadersBodyAndRcpt).run_connection([b"just a body\r\n"])
    assert result.negotiation.protocol & ProtocolOpts.NO_EOH
    assert not result.negotiation.protocol & ProtocolOpts.NR_EOH
    assert result.messages[0].header("X-Shape") == "0 13"
