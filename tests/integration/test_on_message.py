"""on_message behind the real libmilter: the delivered message, the spool, the size policy."""

from __future__ import annotations

import os
import re
from email.parser import BytesParser
from email.policy import default
from pathlib import Path

import pytest
from typing_extensions import override

from pymilterkit import Actions, Message, MilterSession, Status
from pymilterkit.testing import Harness, MilterClient, MilterProcess

from .test_metrics import endpoint, get

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = (
    b"From: a@example.net\r\nX-Spam-Flag:  YES\r\nSubject:  two spaces\r\n"
    b"Received: from one\r\n\tfolded\r\nReceived: from two\r\n\r\n"
    + b"line of the body\r\n" * 200
)


class Editor(MilterSession):
    actions = Actions.ADD_HEADER | Actions.CHANGE_HEADER | Actions.CHANGE_BODY
    too_big = Status.REJECT

    @override
    def on_message(self, message: Message) -> Status:
        mail = message.email
        spool = os.readlink(f"/proc/self/fd/{message._buffer._spool.fileno()}")
        mode = os.fstat(message._buffer._spool.fileno()).st_mode & 0o777
        del mail["X-Spam-Flag"]
        mail.replace_header("Subject", f"[{len(message.recipients)}] " + mail["Subject"])
        mail["X-Spool"] = f"{oct(mode)} {message._buffer.on_disk} {spool.split(' ')[0]}"
        body = mail.get_content()
        assert isinstance(body, str)
        mail.set_content(body + "-- \nchecked\n")
        return Status.CONTINUE


def test_edits_through_libmilter_equal_the_harness(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    args = ["--spool-threshold", "1000", "--spool-dir", str(spool), "--max-message-size",
            "20000", "--metrics", "127.0.0.1:0"]
    rcpts = ["a@example.org", "b@example.org"]
    with MilterProcess(f"{__name__}:Editor", args=args, cwd=ROOT) as process:
        client = MilterClient(process.socket)
        result = client.run(MESSAGE, recipients=rcpts)
        big = client.run(MESSAGE + b"x" * 20000)
        metrics = get(endpoint(process), "/metrics")[1]
        log = process.log()
    assert result.status is Status.CONTINUE
    delivered = BytesParser(policy=default).parsebytes(result.delivered)
    assert "X-Spam-Flag" not in delivered and delivered["Subject"] == "[2] two spaces"
    mode, on_disk, where = str(delivered["X-Spool"]).split()
    assert (mode, on_disk) == ("0o600", "True") and where.startswith(str(spool))
    assert os.listdir(spool) == []  # an unnamed file: nothing left behind
    assert result.delivered.endswith(b"line of the body\r\n-- \r\nchecked\r\n")
    assert b"Received: from one\r\n\tfolded\r\n" in result.delivered  # untouched, exact
    harness = Harness(Editor).run(MESSAGE, recipients=rcpts)

    def without_spool(mods: tuple[object, ...]) -> list[object]:
        return [m for m in mods if getattr(m, "name", "") != "X-Spool"]

    assert without_spool(harness.modifications) == without_spool(result.modifications)

    assert big.status is Status.REJECT and big.reply is not None
    assert str(big.reply).startswith("552 5.3.4")
    assert "past max_message_size (20000 bytes)" in log
    assert re.search(r"pymilterkit_messages_too_big_total 1\.0", metrics), metrics
