"""Recordings read back and played again (`Recording`, `pymilterkit replay`), from files
written here by hand as the recorder writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import override

from pymilterkit import Actions, ConfigurationError, EsmtpParams, MilterSession, Status
from pymilterkit.__main__ import main
from pymilterkit.testing import Harness, Recording

HEAD = {"format": "pymilterkit-record", "version": 1, "filter": "t:F", "pid": 1, "body": True,
        "protocol": 0, "time": 0.0}


def entry(stage: str, *args: Any, answer: str | None = "CONTINUE",
          actions: list[list[Any]] | None = None) -> dict[str, Any]:
    """One recorded stage line."""
    line: dict[str, Any] = {"stage": stage, "args": list(args), "macros": {}}
    if answer is not None:
        line.update(answer=answer, ms=0.1)
    if actions:
        line["actions"] = actions
    return line


CONNECT = entry("connect", "mail.example.net", ["inet", "192.0.2.1", 25])
HELO = entry("helo", "mail.example.net")


def message(subject: str = "hi", eom: str = "CONTINUE", actions: list[list[Any]] | None = None,
            rcpt: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A whole message's lines, from MAIL to end of message."""
    return [entry("mail", "<a@example.net>", ""), rcpt or entry("rcpt", "<b@example.org>", ""),
            entry("data"), entry("header", "Subject", subject), entry("eoh"),
            entry("body", "hello\r\n"), entry("eom", answer=eom, actions=actions)]


def write(path: Path, *lines: dict[str, Any], end: bool = True,
          head: dict[str, Any] = HEAD) -> Path:
    rows = [head, *lines, *([{"end": "close"}] if end else [])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class Blanker(MilterSession):
    """Deletes a header."""

    actions = Actions.CHANGE_HEADER

    @override
    def on_eom(self) -> Status:
        self.change_header("X-Old", None)
        return Status.CONTINUE


def test_a_header_changed_to_empty_is_recorded_as_deleted_as_the_wire_reads_it(
    tmp_path: Path,
) -> None:
    # Recorded before change_header(name, "") was refused: the MTA deleted the header.
    recording = Recording.load(write(tmp_path / "a.milterlog", CONNECT, HELO, *message(
        actions=[["change_header", "X-Old", 1, ""]])))
    assert recording.recorded[0].modifications == ("HeaderDeleted('X-Old', 1)",)
    with Harness(Blanker) as harness:
        assert recording.replay(harness) == recording.recorded


class Subjects(MilterSession):
    """Notes the message's (only) header: its Subject."""

    subject = ""

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.subject = value
        return Status.CONTINUE


class LateReply(Subjects):
    """Sets its reply at RCPT; refuses at end of message, by the Subject."""

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if recipient.startswith("<late@"):
            self.set_reply("550", "5.7.1", "refused at the end")
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        return {"first": Status.TEMPFAIL, "second": Status.REJECT}.get(self.subject,
                                                                       Status.CONTINUE)


def test_a_reply_set_in_an_earlier_stage_goes_with_a_later_refusal_of_its_class(
    tmp_path: Path,
) -> None:
    # As libmilter: the 5xx text set at RCPT does not go with a TEMPFAIL and stays, for the
    # REJECT of the next message.
    late = entry("rcpt", "<late@example.org>", "",
                 actions=[["set_reply", "550", "5.7.1", ["refused at the end"]]])
    recording = Recording.load(write(tmp_path / "a.milterlog", CONNECT, HELO,
                                     *message("first", "TEMPFAIL", rcpt=late),
                                     *message("second", "REJECT")))
    assert [o.lines()[0] for o in recording.recorded] == [
        "TEMPFAIL at eom", "REJECT at eom 550 5.7.1 refused at the end"]
    with Harness(LateReply) as harness:
        assert recording.replay(harness) == recording.recorded


class Tagger(Subjects):
    """No `on_mail`: tags each message at its end, refuses Subject 'bad'."""

    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:
        if self.subject == "bad":
            return Status.REJECT
        self.add_header("X-Tag", self.subject)
        return Status.CONTINUE


class StricterTagger(Tagger):
    @override
    def on_eom(self) -> Status:
        return Status.REJECT if self.subject == "good" else super().on_eom()


def test_a_filter_without_on_mail_has_its_messages_told_apart_at_their_end(
    tmp_path: Path,
) -> None:
    recording = Recording.load(write(
        tmp_path / "a.milterlog", entry("header", "Subject", "bad"), entry("eom", answer="REJECT"),
        entry("header", "Subject", "good"),
        entry("eom", actions=[["add_header", "X-Tag", "good"]])))
    assert [o.lines() for o in recording.recorded] == [
        ["REJECT at eom"], ["CONTINUE at eom", "HeaderAdded('X-Tag', 'good')"]]
    assert [raw for _, raw in recording.messages] == [b"Subject: bad\r\n\r\n",
                                                      b"Subject: good\r\n\r\n"]
    with Harness(Tagger) as harness:
        assert recording.replay(harness) == recording.recorded
        result = harness.run_connection(recording.messages, client=recording.client)
        assert [m.status for m in result.messages] == [Status.REJECT, Status.CONTINUE]
    with Harness(StricterTagger) as harness:
        assert [o.lines() for o in recording.replay(harness)] == [["REJECT at eom"]] * 2


class Picky(MilterSession):
    """Refuses unknown commands, and the HELO `refused`."""

    refused = "bad.example"

    @override
    def on_helo(self, hostname: str) -> Status:
        return Status.REJECT if hostname == self.refused else Status.CONTINUE

    @override
    def on_unknown(self, command: str) -> Status:
        return Status.REJECT

    @override
    def on_eom(self) -> Status:
        return Status.CONTINUE


class PickyAtEnd(Picky):
    @override
    def on_eom(self) -> Status:
        return Status.REJECT


class Pickier(Picky):
    refused = "mail.example.net"


def test_a_refused_unknown_command_or_helo_said_again_refuses_that_command_only(
    tmp_path: Path,
) -> None:
    recording = Recording.load(write(
        tmp_path / "a.milterlog", CONNECT, entry("helo", "bad.example", answer="REJECT"), HELO,
        entry("unknown", "XFOO bar", answer="REJECT"), *message(),
        entry("unknown", "XBAR", answer="REJECT"), *message()))
    assert [o.lines() for o in recording.recorded] == [
        ["CONTINUE at eom", "helo bad.example: REJECT", "unknown XFOO bar: REJECT"],
        ["CONTINUE at eom", "unknown XBAR: REJECT"]]
    with Harness(Picky) as harness:
        assert recording.replay(harness) == recording.recorded
        # As harness input: the HELO that counted, the unknown commands
        assert recording.client.helo == "mail.example.net"
        result = harness.run_connection(recording.messages, client=recording.client)
        assert [m.status for m in result.messages] == [Status.CONTINUE] * 2
        assert [a.status for a in result.unknown] == [Status.REJECT] * 2
    with Harness(PickyAtEnd) as harness:  # played on after the refusals: the change shows
        assert [o.lines()[0] for o in recording.replay(harness)] == ["REJECT at eom"] * 2
    with Harness(Pickier) as harness:  # the last HELO refused: the connection ends there
        assert [o.lines() for o in recording.replay(harness)] == [["REJECT at helo"]] * 2


def test_a_refused_last_helo_ends_the_connection(tmp_path: Path) -> None:
    recording = Recording.load(write(tmp_path / "a.milterlog", CONNECT,
                                     entry("helo", "mail.example.net", answer="REJECT")))
    assert [o.lines() for o in recording.recorded] == [["REJECT at helo"]]
    with Harness(Pickier) as harness:
        assert recording.replay(harness) == recording.recorded


def test_a_part_file_keeps_every_message_handed_over_and_drops_one_a_cut_line_was_in(
    tmp_path: Path,
) -> None:
    # A killed worker: message 1 was refused at MAIL, handed over when message 2 began.
    refused = entry("mail", "<reject@example.net>", "",
                    actions=[["set_reply", "550", "5.7.1", ["sender refused"]]],
                    answer="REJECT")
    part = Recording.load(write(tmp_path / "a.milterlog.part", CONNECT, HELO, refused,
                                end=False))
    assert not part.complete
    assert [o.lines() for o in part.recorded] == [["REJECT at mail 550 5.7.1 sender refused"]]
    assert [e.sender for e, _ in part.messages] == ["<reject@example.net>"]

    # A writer killed mid-write: the message its last line was in is gone, the one before
    # stays, whole.
    path = write(tmp_path / "b.milterlog.part", CONNECT, HELO, *message("one"),
                 *message("two")[:3], end=False)
    with path.open("a") as file:
        file.write('{"stage":"hea')
    torn = Recording.load(path)
    assert [e["stage"] for e in torn.entries][-2:] == ["body", "eom"]
    assert [raw.split(b"\r\n")[0] for _, raw in torn.messages] == [b"Subject: one"]


@pytest.mark.parametrize(("line", "problem"), [
    ('["stage", "mail"]', "not a JSON object"),
    ('{"stage": "mail"', "not JSON"),
    ('{"stage": "bogus", "args": []}', "unknown stage 'bogus'"),
    ('{"stage": "mail", "answer": "CONTINUE"}', "mail: arguments None are not text, text"),
    ('{"stage": "helo", "args": ["a\\u0000b"]}', "helo: arguments"),
    ('{"stage": "helo", "args": ["\\ud800"]}', "helo: arguments"),
    ('{"stage": "connect", "args": ["h", ["inet", "192.0.2.300", 25]]}', "connect: arguments"),
    ('{"stage": "connect", "args": ["h", ["inet", "192.0.2.3", 70000]]}', "connect: arguments"),
    ('{"stage": "mail", "args": ["<a@b>", ""], "answer": "MAYBE"}', "mail: unknown answer 'MAYBE'"),
    ('{"stage": "mail", "args": ["<a@b>", ""], "answer": ["REJECT"]}', "mail: unknown answer"),
    ('{"stage": "mail", "args": ["<a@b>", ""], "macros": ["i", "Q"]}', "mail: macros are not"),
    ('{"stage": "eom", "args": [], "actions": [["add_header", "X"]]}', "eom: malformed action"),
    ('{"stage": "eom", "args": [], "actions": [["set_reply", "550", null, "no"]]}',
     "eom: malformed action"),
    ('{"stage": "eom", "args": [], "actions": [["explode"]]}', "eom: malformed action"),
])
def test_a_malformed_line_is_a_configuration_error_naming_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = tmp_path / "a.milterlog"
    path.write_text(json.dumps(HEAD) + "\n" + line + "\n")
    with pytest.raises(ConfigurationError, match=rf"a\.milterlog line 2: {re.escape(problem)}"):
        Recording.load(path)


def test_replay_reports_a_malformed_file_as_failed_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "a.milterlog", CONNECT, {"stage": "mail", "answer": "CONTINUE"})
    write(tmp_path / "b.milterlog", CONNECT, HELO, *message())
    assert main(["replay", "--json", str(tmp_path), "--filter", f"{__name__}:Picky"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(Path(m["file"]).name, m["result"]) for m in report["messages"]] == [
        ("a.milterlog", "failed"), ("b.milterlog", "same")]
    assert "a.milterlog line 3: mail: arguments" in report["messages"][0]["error"]


def test_the_text_report_escapes_bytes_that_are_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "a.milterlog", CONNECT, HELO,
          entry("unknown", "XFOO \udcff", answer="REJECT"),
          entry("mail", "<s\udcff@example.net>", ""), *message()[1:])
    assert main(["replay", str(tmp_path), "--filter", f"{__name__}:PickyAtEnd"]) == 1
    out = capsys.readouterr().out
    assert "a.milterlog #1 <s\\udcff@example.net> 'hi'\n" in out
    assert "unknown XFOO \\udcff: REJECT | unknown XFOO \\udcff: REJECT\n" in out


class Counter(MilterSession):
    """Answers by how many ESMTP parameters MAIL carries."""

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return Status.TEMPFAIL if len(params) == 2 else Status.CONTINUE


def test_an_empty_esmtp_parameter_is_played_again(tmp_path: Path) -> None:
    # A client sent MAIL with an empty argument before X=1 (libmilter passes it on).
    recording = Recording.load(write(tmp_path / "a.milterlog", CONNECT, HELO,
                                     entry("mail", "<a@example.net>", " X=1", answer="TEMPFAIL")))
    with Harness(Counter) as harness:
        assert recording.replay(harness) == recording.recorded


class Sizer(MilterSession):
    """Adds the size of the body it was sent."""

    actions = Actions.ADD_HEADER
    size = 0

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.size += len(chunk)
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Size", str(self.size))
        return Status.CONTINUE


def test_a_message_recorded_without_its_body_that_comes_out_otherwise_is_unsure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bodiless = [*message()[:5], {"stage": "body", "size": 7, "args": [None], "answer": "CONTINUE"},
                entry("eom", actions=[["add_header", "X-Size", "7"]])]
    write(tmp_path / "a.milterlog", CONNECT, HELO, *bodiless, *message()[:5],
          entry("eom", actions=[["add_header", "X-Size", "0"]]), head=dict(HEAD, body=False))
    argv = ["replay", str(tmp_path), "--filter", f"{__name__}:Sizer"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["result"] for m in report["messages"]] == ["unsure", "same"]
    assert report["messages"][0]["note"].startswith("recorded without its body")
    assert report["summary"] == {"same": 1, "changed": 0, "failed": 0, "unsure": 1}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "a.milterlog #1 <a@example.net> 'hi': recorded without its body" in out
    assert out.endswith("2 message(s): 1 same, 0 changed, 0 failed, 1 unsure (no body "
                        "recorded)\n")


def test_a_body_chunk_bigger_than_the_wire_client_takes_is_played_in_pieces(
    tmp_path: Path,
) -> None:
    # Sendmail sends up to 1 MiB at once to a filter that asks for it (ProtocolOpts.MDS_1M).
    big = 70000
    recording = Recording.load(write(tmp_path / "a.milterlog", CONNECT, HELO, *message()[:5],
                                     entry("body", "x" * big),
                                     entry("eom", actions=[["add_header", "X-Size", str(big)]])))
    with Harness(Sizer) as harness:
        assert recording.replay(harness) == recording.recorded
