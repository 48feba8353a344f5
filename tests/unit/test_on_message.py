"""on_message: negotiation, collection, order against on_eom, edits as actions, size policy."""

from __future__ import annotations

import asyncio
import logging
import os
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default
from typing import Any

import pytest
from typing_extensions import override

from pymilterkit import (
    Actions,
    ConfigurationError,
    EsmtpParams,
    Message,
    Milter,
    MilterSession,
    ProtocolError,
    ProtocolOpts,
    Status,
    UndeclaredActionError,
    noreply,
)
from pymilterkit._message import MessageBuffer
from pymilterkit.testing import (
    ALL_PROTOCOL,
    Harness,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    Step,
)

MESSAGE = (
    b"From: a@example.net\r\n"
    b"X-Spam-Flag:  YES\r\n"
    b"Received: from one\r\n"
    b"Subject:no space\r\n"
    b"Received: from two\r\n"
    b"\r\n"
    b"Hello\r\n"
)
ALL = Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.CHANGE_BODY


def unfolded(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    parsed = BytesParser(policy=default).parsebytes(raw)
    _, _, body = raw.partition(b"\r\n\r\n")
    return [(n.lower(), " ".join(str(v).split())) for n, v in parsed.items()], body


class Seen(MilterSession):
    seen: list[Any]

    @override
    def on_message(self, message: Message) -> Status:
        with message.open() as raw:
            type(self).seen = [message.sender, message.recipients, list(message.headers),
                               message.size, raw.read(), message.queue_id]
        return Status.CONTINUE


def test_negotiation_collects_mail_rcpt_and_end_of_headers_without_replies() -> None:
    spec = Seen.negotiation()
    assert {"on_mail", "on_rcpt", "on_header", "on_eoh", "on_body", "on_eom"} <= spec.stages
    assert spec.protocol & ProtocolOpts.HDR_LEADSPC
    for flag in (ProtocolOpts.NR_MAIL, ProtocolOpts.NR_RCPT, ProtocolOpts.NR_EOH,
                 ProtocolOpts.NO_CONNECT, ProtocolOpts.NO_HELO):
        assert spec.protocol & flag, flag
    for flag in (ProtocolOpts.NO_HDRS, ProtocolOpts.NO_BODY, ProtocolOpts.NO_MAIL,
                 ProtocolOpts.NO_EOH, ProtocolOpts.NR_HDR, ProtocolOpts.NR_BODY):
        assert not spec.protocol & flag, flag
    assert MilterSession.negotiation().stages == frozenset()


def test_message_is_exact() -> None:
    result = Harness(Seen, reraise=True).run(MESSAGE, recipients=["x@example.org", "y@ex.org"])
    sender, recipients, headers, size, raw, _ = Seen.seen
    assert raw == MESSAGE and size == len(MESSAGE)
    assert sender == "<sender@example.net>"
    assert recipients == ("<x@example.org>", "<y@ex.org>")
    assert headers[1] == ("X-Spam-Flag", "  YES") and headers[3] == ("Subject", "no space")
    assert result.modifications == () and result.delivered == MESSAGE and result.diff() == ""


class Mixin(MilterSession):
    actions = Actions.ADD_HEADER
    order: list[str] = []

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return Status.REJECT if recipient.startswith("<bad") else Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.order.append(f"header {name}:{value}")
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.order.append("eom")
        self.add_header("X-Eom", "yes")
        return Status.CONTINUE


class Whole(Mixin):
    verdict = Status.CONTINUE

    @override
    def on_message(self, message: Message) -> Status:
        self.order.append(f"message {message.recipients}")
        self.add_header("X-Own", "1")  # the session's actions work here too
        message.email["X-Edited"] = "2"
        return self.verdict


def test_mixes_with_other_stages_and_runs_before_on_eom() -> None:
    spec = Whole.negotiation()
    assert not spec.protocol & ProtocolOpts.NR_HDR
    assert not spec.protocol & ProtocolOpts.NR_RCPT  # overridden: answered
    assert spec.protocol & ProtocolOpts.NR_MAIL
    Mixin.order.clear()
    result = Harness(Whole, reraise=True).run(MESSAGE, recipients=["ok@x.org", "bad@x.org"])
    # on_header sees the value as without HDR_LEADSPC (the class did not ask for it)
    assert Mixin.order[1] == "header X-Spam-Flag: YES"
    assert Mixin.order[-2:] == ["message ('<ok@x.org>',)", "eom"]
    assert result.headers_added == (
        HeaderAdded("X-Own", " 1"), HeaderAdded("X-Edited", " 2"), HeaderAdded("X-Eom", " yes"))
    assert result.delivered.endswith(b"X-Own: 1\r\nX-Edited: 2\r\nX-Eom: yes\r\n\r\nHello\r\n")


def test_eom_not_called_after_a_verdict() -> None:
    class Rejecting(Whole):
        verdict = Status.REJECT

    Mixin.order.clear()
    result = Harness(Rejecting).run(MESSAGE)
    assert result.status is Status.REJECT and "eom" not in Mixin.order
    assert result.delivered == b"" and result.headers_added == (HeaderAdded("X-Own", " 1"),)


def test_async_on_message() -> None:
    class Async(MilterSession):
        actions = Actions.ADD_HEADER

        @override
        async def on_message(self, message: Message) -> Status:
            message.email["X-Async"] = str(len(message.headers))
            return Status.CONTINUE

    assert "on_eom" in Async.negotiation().asynchronous
    result = Harness(Async, reraise=True).run(MESSAGE)
    assert result.headers_added == (HeaderAdded("X-Async", " 5"),)


class Editor(MilterSession):
    actions = ALL

    @override
    def on_message(self, message: Message) -> Status:
        mail = message.email
        del mail["X-Spam-Flag"]
        mail.replace_header("Subject", "now with space")
        mail["X-Long"] = "word " * 30
        mail.set_content("Bye\n")
        type(self).edited = mail.as_bytes(policy=default.clone(linesep="\r\n"))
        return Status.CONTINUE

    edited: bytes = b""


def test_edits_become_the_fewest_actions() -> None:
    result = Harness(Editor, reraise=True).run(MESSAGE)
    assert result.headers_deleted == (HeaderDeleted("X-Spam-Flag", 1),)
    assert result.headers_changed == (HeaderChanged("Subject", 1, " now with space"),)
    assert unfolded(result.delivered) == unfolded(Editor.edited)
    assert "-X-Spam-Flag:  YES" in result.diff() and "+Bye" in result.diff()


@pytest.mark.parametrize(
    "head", [b"X-A:1\r\nX-B: 1\r\n", b"X-Spam-Level:\r\nX-Other: \r\n"],
    ids=["same-one-character-value", "empty-values"],
)
def test_headers_with_equal_short_values_stay_untouched(head: bytes) -> None:
    # Python keeps one object for equal one-character and empty strings: headers are told
    # apart by their own entry, not by the identity of their value.
    class AddOnly(MilterSession):
        actions = Actions.ADD_HEADER

        @override
        def on_message(self, message: Message) -> Status:
            message.email["X-Scanned"] = "yes"
            return Status.CONTINUE

    result = Harness(AddOnly, reraise=True).run(head + b"Subject: hi\r\n\r\nbody\r\n")
    assert result.status is Status.CONTINUE
    assert result.modifications == (HeaderAdded("X-Scanned", " yes"),)


@pytest.mark.parametrize("refused", [False, True], ids=["plain", "rcpt-rej"])
def test_recipients_are_the_accepted_ones(refused: bool) -> None:
    # Refused by the filter, answered an invalid result, or (RCPT_REJ) refused by the MTA
    # itself ({rcpt_mailer} error): not among the message's recipients.
    class Seen(MilterSession):
        protocol = ProtocolOpts.RCPT_REJ if refused else ProtocolOpts.NONE
        recipients: tuple[str, ...] = ()

        @override
        def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
            if "bad" in recipient:
                return "nonsense"  # type: ignore[return-value]
            return Status.REJECT if "no" in recipient else Status.CONTINUE

        @override
        def on_message(self, message: Message) -> Status:
            type(self).recipients = message.recipients
            return Status.CONTINUE

    conn = Harness(Seen).open()
    conn.negotiate()
    conn.connect("client.example.net", None)
    conn.mail("<a@example.net>")
    for recipient, mailer in [("<yes@x>", "smtp"), ("<no@x>", "smtp"), ("<bad@x>", "smtp"),
                              ("<gone@x>", "error")]:
        conn.macros(Step.RCPT, {"{rcpt_mailer}": mailer})
        conn.rcpt(recipient)
    conn.header("Subject", " x")
    conn.eoh()
    conn.eom()
    conn.quit()
    assert Seen.recipients == (("<yes@x>",) if refused else ("<yes@x>", "<gone@x>"))


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_skip_from_on_body_ends_its_chunks_not_the_collection(asynchronous: bool) -> None:
    class Skipper(MilterSession):
        chunks = 0
        size = 0

        def count(self) -> Status:
            type(self).chunks += 1
            return Status.SKIP

        @override
        def on_message(self, message: Message) -> Status:
            type(self).size = len(message.open().read().partition(b"\r\n\r\n")[2])
            return Status.CONTINUE

    class Sync(Skipper):
        @override
        def on_body(self, chunk: bytes) -> Status:
            return self.count()

    class Async(Skipper):
        @override
        async def on_body(self, chunk: bytes) -> Status:
            return self.count()

    cls = Async if asynchronous else Sync
    body = b"x" * 998 + b"\r\n"
    result = Harness(cls, reraise=True).run(b"Subject: big\r\n\r\n" + body * 150)
    assert result.status is Status.CONTINUE
    assert (cls.chunks, cls.size) == (1, 150 * len(body))


def test_an_mta_without_leading_space_headers_is_told_why_it_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = Harness(Seen, protocol=ALL_PROTOCOL & ~ProtocolOpts.HDR_LEADSPC)
    with pytest.raises(ProtocolError, match="during negotiate"):
        harness.run(MESSAGE)
    assert "the MTA does not offer protocol options <ProtocolOpts.HDR_LEADSPC: " in caplog.text
    assert "that Seen needs (on_message: the header values exactly as received)" in caplog.text


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_recipients_after_a_failed_on_rcpt_follow_the_answer_sent(fail_open: bool) -> None:
    # Past its deadline the MTA is answered the timeout status, after an exception the error
    # status: the recipient is the message's if that status accepts it.
    class Failing(MilterSession):
        recipients: tuple[str, ...] = ()

        @override
        async def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
            if "slow" in recipient:
                await asyncio.sleep(5)
            if "bug" in recipient:
                raise RuntimeError("a bug")
            return Status.CONTINUE

        @override
        def on_message(self, message: Message) -> Status:
            type(self).recipients = message.recipients
            return Status.CONTINUE

    status = Status.CONTINUE if fail_open else Status.TEMPFAIL
    harness = Harness(Failing, stage_timeout={"rcpt": 0.05}, timeout_status=status,
                      error_status=status)
    result = harness.run(MESSAGE, recipients=["ok@x", "slow@x", "bug@x"])
    assert [r.status for r in result.recipients] == [Status.CONTINUE, status, status]
    assert Failing.recipients == (("<ok@x>", "<slow@x>", "<bug@x>") if fail_open else ("<ok@x>",))


def test_undeclared_action_names_action_and_edit() -> None:
    class Undeclared(Editor):
        actions = Actions.ADD_HEADER

    assert Undeclared.negotiation().actions == ALL  # unioned over the MRO

    class Narrow(MilterSession):
        actions = Actions.ADD_HEADER

        @override
        def on_message(self, message: Message) -> Status:
            del message.email["X-Spam-Flag"]
            return Status.CONTINUE

    with pytest.raises(UndeclaredActionError, match=r"delete header X-Spam-Flag #1.*"
                       r"change_header\(\) needs Actions.CHANGE_HEADER"):
        Harness(Narrow, reraise=True).run(MESSAGE)
    result = Harness(Narrow).run(MESSAGE)  # the runner's policy: error status, no action
    assert result.status is Status.TEMPFAIL and result.modifications == ()


def test_unchanged_body_is_not_replaced_and_big_messages_spool() -> None:
    class Headers(MilterSession):
        actions = ALL
        buffer: MessageBuffer

        @override
        def on_message(self, message: Message) -> Status:
            buffer = message._buffer
            assert buffer.on_disk
            assert os.fstat(buffer._spool.fileno()).st_mode & 0o777 == 0o600
            message.email["X-Size"] = str(message.size)
            type(self).buffer = buffer
            return Status.CONTINUE

    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1200
    result = Harness(Headers, reraise=True).run(big)
    assert result.new_body is None and result.headers_added == (
        HeaderAdded("X-Size", f" {len(big)}"),)
    assert Headers.buffer._spool.closed  # removed at the end of the message


def test_buffer_closed_on_error_and_abort() -> None:
    buffers = []

    class Raising(MilterSession):
        @override
        def on_message(self, message: Message) -> Status:
            buffers.append(message._buffer)
            raise ValueError("boom")

    assert Harness(Raising).run(MESSAGE).status is Status.TEMPFAIL
    assert buffers[0]._spool.closed

    class Refusing(MilterSession):
        @override
        def on_eoh(self) -> Status:
            assert self._pmk_collected is not None
            buffers.append(self._pmk_collected.buffer)
            return Status.REJECT  # the message ends before its body: abort

        @override
        def on_message(self, message: Message) -> Status:
            raise AssertionError("not reached")

    conn = Harness(Refusing, reraise=True).run_connection([MESSAGE, MESSAGE])
    assert [m.status for m in conn.messages] == [Status.REJECT, Status.REJECT]
    assert len(buffers) == 3 and all(b._spool.closed for b in buffers)


@pytest.mark.parametrize("too_big", [Status.CONTINUE, Status.REJECT])
def test_too_big(too_big: Status, caplog: pytest.LogCaptureFixture) -> None:
    called = []

    class Limited(MilterSession):
        max_message_size = 60

        @override
        def on_message(self, message: Message) -> Status:
            called.append(message.size)
            return Status.CONTINUE

    Limited.too_big = too_big
    caplog.set_level(logging.INFO, logger="pymilterkit")
    assert Harness(Limited, reraise=True).run(b"Subject: x\r\n\r\nsmall\r\n").status is (
        Status.CONTINUE)
    result = Harness(Limited, reraise=True).run(MESSAGE + b"x" * 100)
    assert called == [len(b"Subject: x\r\n\r\nsmall\r\n")]
    assert result.status is too_big
    if too_big is Status.REJECT:
        assert result.reply is not None and str(result.reply).startswith("552 5.3.4")
    assert "past max_message_size (60 bytes)" in caplog.text


def test_message_email_is_an_email_message() -> None:
    class Parsed(MilterSession):
        @override
        def on_message(self, message: Message) -> Status:
            assert isinstance(message.email, EmailMessage)
            assert message.email is message.email
            assert message.email["Subject"] == "no space"
            return Status.CONTINUE

    assert Harness(Parsed, reraise=True).run(MESSAGE).status is Status.CONTINUE


def test_noreply_on_message_is_refused() -> None:
    with pytest.raises(TypeError, match="@noreply"):

        class Bad(MilterSession):
            @noreply
            def on_message(self, message: Message) -> Status:
                return Status.CONTINUE


def test_settings_are_checked() -> None:
    with pytest.raises(TypeError, match="max_message_size must be"):

        class Zero(MilterSession):
            max_message_size = 0

            @override
            def on_message(self, message: Message) -> Status:
                return Status.CONTINUE

    for bad in ({"spool_threshold": 0}, {"spool_dir": "/nonexistent/x"},
                {"spool_dir": "/proc"}, {"max_message_size": -1}):
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            Milter(Seen, "unix:/tmp/x.sock", **bad)
    assert Milter(Seen, "unix:/tmp/x.sock", max_message_size=10).options.max_message_size == 10


def test_an_edit_below_the_top_headers_replaces_the_body() -> None:
    class SubpartHeader(MilterSession):
        actions = ALL

        @override
        def on_message(self, message: Message) -> Status:
            for part in message.email.walk():
                if part.get_filename() == "a.txt":
                    part["X-Checked"] = "yes"
            return Status.CONTINUE

    mail = EmailMessage()
    mail["Subject"] = "parts"
    mail.set_content("text\n")
    mail.add_attachment("attached\n", filename="a.txt")
    original = mail.as_bytes(policy=default.clone(linesep="\r\n"))
    result = Harness(SubpartHeader, reraise=True).run(original)
    assert result.new_body is not None and b"X-Checked: yes\r\n" in result.new_body
    assert result.modifications[:-1] == ()  # the top headers did not change
