"""`--record DIR` behind the real libmilter: one whole file per connection, verdicts unchanged."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from pymilterkit.testing import Harness, MilterClient, MilterProcess
from tests.record_filters import Decider, corpus

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
    connect = next(e for e in every if e["stage"] == "connect")
    assert connect["macros"]["j"] == "mx.example.org"
    assert connect["args"][1][0] == "inet"
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

