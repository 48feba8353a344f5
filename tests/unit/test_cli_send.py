"""`pymilterkit send` (through `main(argv)`) against filters run by the real runner."""

from __future__ import annotations

import json
import mailbox
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymilterkit.__main__ import main
from pymilterkit.testing import MilterProcess

MESSAGE = b"From: a@example.net\r\nSubject: cli test\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def rcpt_count() -> Iterator[MilterProcess]:
    with MilterProcess("examples.rcpt_count:RcptCount") as process:
        yield process


@pytest.fixture(scope="module")
def verdicts() -> Iterator[MilterProcess]:
    with MilterProcess("tests.integration.filters:VerdictAt") as process:
        yield process


@pytest.fixture
def eml(tmp_path: Path) -> Path:
    path = tmp_path / "one.eml"
    path.write_bytes(MESSAGE)
    return path


def test_one_message_prints_the_whole_conversation(
    rcpt_count: MilterProcess, eml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["send", "--socket", rcpt_count.socket, "--from", "s@example.net",
                 "--to", "a@example.org", "--to", "b@example.org", str(eml)])
    out = capsys.readouterr().out
    assert code == 0
    assert "negotiation: version 6" in out
    assert "actions:  ADD_HEADER" in out
    assert "mail <s@example.net>: continue" in out
    assert "rcpt <b@example.org>: continue" in out
    assert "HeaderAdded(name='X-Rcpt-Count', value='2')" in out
    assert out.rstrip().endswith("verdict: CONTINUE at eom")


def test_diff_prints_what_the_milter_changed(
    rcpt_count: MilterProcess, eml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["send", "--socket", rcpt_count.socket, "--to", "a@example.org", "--diff",
                 str(eml)])
    out = capsys.readouterr().out
    assert code == 0
    assert "--- original\n+++ delivered\n" in out and "\n+X-Rcpt-Count: 1\n" in out


def test_json_output(rcpt_count: MilterProcess, eml: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["send", "--json", "--socket", rcpt_count.socket, "--to", "a@example.org",
                 str(eml)])
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    (entry,) = document["messages"]
    assert entry["source"] == str(eml)
    assert entry["negotiation"]["actions"] == ["ADD_HEADER"]
    message = entry["messages"][0]
    assert message["status"] == "CONTINUE" and message["stage"] == "eom"
    assert message["modifications"] == [
        {"type": "HeaderAdded", "name": "X-Rcpt-Count", "value": "1"}]
    assert document["summary"] == {"messages": 1, "verdicts": {"CONTINUE": 1}, "failures": []}


def test_directory_and_mbox_give_progress_and_a_summary(
    rcpt_count: MilterProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    for name in ("b.eml", "a.eml"):
        (folder / name).write_bytes(MESSAGE)
    box = mailbox.mbox(str(tmp_path / "box.mbox"))
    for number in range(3):
        box.add(MESSAGE.replace(b"cli test", f"mbox {number}".encode()))
    box.close()
    code = main(["send", "--socket", rcpt_count.socket, "--to", "a@example.org",
                 str(folder), str(tmp_path / "box.mbox")])
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.splitlines()
    assert lines[0] == f"{folder / 'a.eml'}: CONTINUE at eom (1 modification)"
    assert lines[2] == f"{tmp_path / 'box.mbox'}#1: CONTINUE at eom (1 modification)"
    assert lines[-1] == "summary: 5 messages: 5 continue; 0 failed"
    assert "[5/5]" in captured.err


def test_refused_messages_and_failures_exit_1(
    verdicts: MilterProcess, eml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["send", "--socket", verdicts.socket, "--client-host", "reject.mail",
                 "--to", "a@example.org", str(eml)])
    out = capsys.readouterr().out
    assert code == 1
    assert "mail <sender@example.net>: reject" in out
    assert "verdict: REJECT at mail (550 5.7.1 Command rejected)" in out

    code = main(["send", "--socket", f"unix:{tmp_path}/nobody.sock", "--to", "a@example.org",
                 "-q", str(eml), str(eml)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED: cannot connect to the milter" in out
    assert "summary: 2 messages: none answered; 2 failed" in out


def test_usage_errors_exit_2(eml: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "--socket", "unix:/x.sock", "--to", "a@b",
                 str(tmp_path / "missing.eml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["send", "--socket", "bogus:1", "--to", "a@b", str(eml)]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["send", "--socket", "unix:/x.sock", str(eml)])  # --to is required
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(["send", "--socket", "unix:/x.sock", "--to", "a@b", "--macro", "bogus:i=1",
                 str(eml)]) == 2
    assert "no macros are sent at 'bogus' (one of connect, helo" in capsys.readouterr().err


def test_version_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pymilterkit ") and "libmilter 1.0.1" in out


def test_json_into_a_closed_pipe_ends_without_a_traceback(
    rcpt_count: MilterProcess, tmp_path: Path
) -> None:
    """`pymilterkit send --json DIR | head -1`: the reader leaves early, no BrokenPipeError."""
    # About 250 KB of JSON, far past what the pipe holds, and read unbuffered here: the reader
    # takes one line and leaves (Python 3.14 reads and writes in 128 KiB chunks, which once
    # let the whole answer through before the reader left).
    for n in range(100):
        (tmp_path / f"{n:03}.eml").write_bytes(MESSAGE)
    send = subprocess.Popen(
        [sys.executable, "-m", "pymilterkit", "send", "--json", "-q", "--socket",
         rcpt_count.socket, "--to", "a@example.org", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    assert send.stdout is not None and send.stderr is not None
    assert send.stdout.readline().startswith(b"{")
    send.stdout.close()  # like `head -1`
    err = send.stderr.read().decode()
    send.stderr.close()
    assert send.wait(30) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_run_does_not_load_the_testing_kit() -> None:
    """The core's command line imports `pymilterkit.testing` only for `send`."""
    code = (
        "import sys\n"
        "from pymilterkit.__main__ import _parser\n"
        "_parser().parse_args(['run', 'm:C', '--socket', 'unix:/x'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('pymilterkit.testing')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
