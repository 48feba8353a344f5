"""`--record DIR` behind the real libmilter: one whole file per connection, verdicts unchanged."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pymilterkit import Status
from pymilterkit.__main__ import main
from pymilterkit.testing import Harness, MilterClient, MilterProcess, Recording
from tests.record_filters import STRICTER_CHANGES, Decider, corpus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8", "surrogateescape").splitlines()]


@pytest.mark.parametrize("target", ["Decider", "AsyncDecider"])
def test_record_writes_one_whole_file_per_connection(tmp_path: Path, target: str) -> None:
    directory = tmp_path / "rec"
    args = ["--record", str(directory), "--workers", "2"]
    with MilterProcess(f"tests.record_filters:{target}", args=args, cwd=ROOT) as milter:
        client = MilterClient(milter.socket)
        got = [client.run_connection(m, client=c).messages for c, m in corpus()]
        assert milter.stop() == 0
    expected = [Harness(Decider).run_connection(m, client=c).messages for c, m in corpus()]
    assert [[(r.status, r.reply, r.modifications) for r in conn] for conn in got] == [
        [(r.status, r.reply, r.modifications) for r in conn] for conn in expected]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert len(files) == len(corpus())
    assert all(f.suffix == ".milterlog" and stat.S_IMODE(f.stat().st_mode) == 0o600
               for f in files)
    records = [lines(f) for f in files]
    heads = [r[0] for r in records]
    assert {h["format"] for h in heads} == {"pymilterkit-record"}
    assert {h["version"] for h in heads} == {1}
    assert all(r[-1] == {"end": "close"} for r in records)
    every = [e for r in records for e in r if e.get("stage")]
    assert {e["stage"] for e in every} >= {"connect", "helo", "unknown", "mail", "rcpt", "data",
                                           "header", "eoh", "body", "eom"}
    assert all(isinstance(e["ms"], float) for e in every if "answer" in e)
    rejects = [e for e in every if e["stage"] == "rcpt" and e["answer"] == "REJECT"]
    assert rejects[0]["actions"] == [["set_reply", "550", "5.1.1", ["no such user"]]]
    assert rejects[0]["macros"]["{rcpt_addr}"] == "nobody@example.org"
    # By host name: which file sorts first depends on which worker served which connection.
    connects = {e["args"][0]: e for e in every if e["stage"] == "connect"}
    assert connects["mail.example.net"]["macros"]["j"] == "mx.example.org"
    assert connects["mail.example.net"]["args"][1][0] == "inet"
    assert connects["unknown"]["args"][1] is None
    acts = {a[0] for e in every for a in e.get("actions", ())}
    assert acts >= {"add_header", "insert_header", "change_header", "delete_header",
                    "change_sender", "add_recipient", "add_recipient_par", "remove_recipient",
                    "replace_body", "quarantine", "set_reply"}
    sizes = sum(e["size"] for e in every if e["stage"] == "body")
    assert sizes > 70000
    assert len({h["pid"] for h in heads}) >= 1


def test_record_body_off_sample_and_unwritable_directory(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    args = ["--record", str(directory), "--record-body", "no"]
    with MilterProcess("tests.record_filters:Decider", args=args, cwd=ROOT) as milter:
        client = MilterClient(milter.socket)
        conn, msgs = corpus()[1]
        client.run_connection(msgs, client=conn)
        assert milter.stop() == 0
    (file,) = directory.iterdir()
    bodies = [e for e in lines(file) if e.get("stage") == "body"]
    assert bodies and all(e["args"] == [None] and e["size"] > 0 for e in bodies)

    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    args = ["--record", str(blocked)]
    with MilterProcess("tests.record_filters:Decider", args=args, cwd=ROOT) as milter:
        client = MilterClient(milter.socket)
        for _ in range(3):
            results = client.run_connection(msgs, client=conn).messages
            assert [r.status.name for r in results][:2] == ["REJECT", "TEMPFAIL"]
        assert milter.stop() == 0
        assert milter.log().count("record: cannot use directory") == 1

    with MilterProcess("tests.record_filters:Decider", args=["--record", str(tmp_path / "s"),
                       "--record-sample", "0"], cwd=ROOT) as milter:
        MilterClient(milter.socket).run_connection(msgs, client=conn)
        assert milter.stop() == 0
    assert not os.path.exists(tmp_path / "s")


def record_corpus(directory: Path, target: str, args: Sequence[str] = ()) -> list[Path]:
    with MilterProcess(f"tests.record_filters:{target}", cwd=ROOT,
                       args=["--record", str(directory), *args]) as milter:
        client = MilterClient(milter.socket)
        for conn, messages in corpus():
            client.run_connection(messages, client=conn)
        assert milter.stop() == 0
    return sorted(directory.iterdir())


def replay_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code = main(["replay", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("target", ["Decider", "AsyncDecider"])
def test_replay_of_the_same_class_changes_nothing_and_a_new_version_what_it_should(
    tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    files = record_corpus(tmp_path / "rec", target, ["--workers", "2"])
    recordings = [Recording.load(f) for f in files]
    assert sum(len(r.recorded) for r in recordings) == 16
    with Harness(Decider) as harness:
        assert [r.replay(harness) for r in recordings] == [r.recorded for r in recordings]
    # What a production case becomes in a regression test: the harness's own input.
    refused, index = next((r, i) for r in recordings for i, o in enumerate(r.recorded)
                          if o.status is Status.REJECT and o.stage == "mail")
    result = Harness(Decider).run_connection(refused.messages, client=refused.client)
    assert result.messages[index].status is Status.REJECT
    reply = result.messages[index].reply
    assert reply is not None and reply.lines == ("sender refused",)

    code, same = replay_json([str(tmp_path / "rec"), "--filter", f"tests.record_filters:{target}"],
                             capsys)
    assert code == 0, same
    assert same["summary"] == {"same": 16, "changed": 0, "failed": 0, "unsure": 0}
    code, changed = replay_json([str(tmp_path / "rec"), "--filter",
                                 "tests.record_filters:Stricter"], capsys)
    assert code == 1
    assert {m["subject"] for m in changed["messages"] if m["result"] == "changed"} == (
        STRICTER_CHANGES)
    late = next(m for m in changed["messages"] if m["subject"] == "late")
    assert "rcpt <later@example.org>: TEMPFAIL" in late["recorded"]
    assert "rcpt <later@example.org>: REJECT 550 5.1.1 gone for good" in late["new"]
    accept = next(m for m in changed["messages"] if m["subject"] == "EOM-ACCEPT")
    assert (accept["recorded"][0], accept["new"][0]) == ("CONTINUE at eom", "ACCEPT at eom")

    with MilterProcess("tests.record_filters:Decider", cwd=ROOT) as milter:
        assert main(["replay", str(tmp_path / "rec"), "--socket", milter.socket]) == 0
        out = capsys.readouterr().out
        assert out.endswith("16 message(s): 16 same, 0 changed, 0 failed\n")
        assert milter.stop() == 0


def test_a_whole_message_filter_is_recorded_and_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "rec"
    text = (b"From: a@example.net\r\nTo: b@example.org\r\nSubject: hi\r\n"
            b"Content-Type: text/plain\r\n\r\nHello.\r\n")
    with MilterProcess("examples.footer:Footer", cwd=ROOT,
                       args=["--record", str(directory)]) as milter:
        result = MilterClient(milter.socket).run(text, recipients=["b@example.org"])
        assert milter.stop() == 0
    assert result.new_body is not None  # the footer, as replace_body
    (recording,) = [Recording.load(f) for f in directory.iterdir()]
    assert any(line.startswith("BodyReplaced(") for line in recording.recorded[0].lines())
    assert main(["replay", str(directory), "--filter", "examples.footer:Footer"]) == 0
    assert capsys.readouterr().out.endswith("1 message(s): 1 same, 0 changed, 0 failed\n")


def test_a_killed_worker_leaves_a_part_file_whole_up_to_its_last_message(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    with MilterProcess("tests.record_filters:Decider", cwd=ROOT,
                       args=["--record", str(directory)]) as milter:
        conn = MilterClient(milter.socket).open()
        conn.negotiate()
        conn.connect("mail.example.net", None)
        conn.helo("mail.example.net")
        conn.mail("<a@example.net>")
        conn.rcpt("<b@example.org>")
        conn.data()
        conn.header("Subject", "first")
        conn.eoh()
        conn.body(b"one\r\n")
        assert conn.eom().status is Status.CONTINUE
        conn.mail("<a@example.net>")  # a second message, cut short by the kill
        conn.rcpt("<b@example.org>")

        def handed_over() -> bool:
            return any(p.stat().st_size for p in directory.glob("*.part"))

        deadline = time.monotonic() + 10
        while not handed_over() and time.monotonic() < deadline:
            time.sleep(0.05)
        milter.signal(signal.SIGKILL)
        milter.wait(10)
        conn.close()
    (part,) = directory.iterdir()
    assert part.name.endswith(".milterlog.part")
    recording = Recording.load(part)
    assert not recording.complete
    assert [o.lines()[0] for o in recording.recorded] == ["CONTINUE at eom"]
    assert recording.messages[0][1].endswith(b"Subject: first\r\n\r\none\r\n")
