"""A fail-open run (error or timeout status CONTINUE/ACCEPT) never delivers a message its
on_eom changed only in part: once a modification went out, a failure is answered TEMPFAIL."""

from __future__ import annotations

import asyncio

import pytest
from typing_extensions import override

from pymilterkit import Actions, MilterSession, Status
from pymilterkit._dispatch import SessionRules
from pymilterkit.testing import Harness

MESSAGE = b"Subject: x\r\n\r\nbody\r\n"


class Half(MilterSession):
    """on_eom adds a header, then fails, for a message whose Subject is `x`."""

    actions = Actions.ADD_HEADER

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.fails = value.strip() == "x"
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Scan", "started")
        if self.fails:
            raise RuntimeError("the scanner went away")
        return Status.CONTINUE


class Unchanged(MilterSession):
    @override
    def on_eom(self) -> Status:
        raise RuntimeError("the scanner went away")


class Slow(MilterSession):
    actions = Actions.CHANGE_BODY

    @override
    async def on_eom(self) -> Status:
        self.replace_body(b"FIRST HALF\r\n")
        await asyncio.sleep(5)
        return Status.CONTINUE


@pytest.mark.parametrize("error_status", [Status.CONTINUE, Status.ACCEPT])
def test_a_failure_after_a_modification_is_answered_tempfail(
    error_status: Status, caplog: pytest.LogCaptureFixture
) -> None:
    conn = Harness(Half, error_status=error_status).run_connection(
        [MESSAGE, MESSAGE.replace(b"x", b"fine", 1)])
    assert [m.status for m in conn.messages] == [Status.TEMPFAIL, Status.CONTINUE]
    assert "Half.on_eom failed after it sent modifications: answering TEMPFAIL, not " \
        f"{error_status.name}, so no half-changed message is delivered" in caplog.text


def test_a_failure_before_any_modification_is_answered_as_configured() -> None:
    assert Harness(Unchanged, error_status=Status.CONTINUE).run(MESSAGE).status is Status.CONTINUE


def test_each_end_of_message_starts_with_no_modification_sent() -> None:
    class ModifiesThenFails(MilterSession):
        """The first message is modified and answered; the second fails before any change."""

        actions = Actions.ADD_HEADER
        count = 0

        @override
        def on_eom(self) -> Status:
            self.count += 1
            if self.count == 2:
                raise RuntimeError("the scanner went away")
            self.add_header("X-Scan", "done")
            return Status.CONTINUE

    conn = Harness(ModifiesThenFails, error_status=Status.CONTINUE).run_connection(
        [MESSAGE, MESSAGE])
    assert [m.status for m in conn.messages] == [Status.CONTINUE, Status.CONTINUE]


def test_a_deadline_after_a_modification_is_answered_tempfail() -> None:
    result = Harness(Slow, stage_timeout={"eom": 0.05}, timeout_status=Status.CONTINUE).run(
        MESSAGE)
    assert result.status is Status.TEMPFAIL
    assert Harness(Slow, stage_timeout={"eom": 0.05}).run(MESSAGE).status is Status.TEMPFAIL


def test_only_a_fail_open_run_with_on_eom_notes_modifications() -> None:
    assert not SessionRules(Half, Status.TEMPFAIL).fail_open  # TEMPFAIL keeps the message
    assert SessionRules(Half, Status.CONTINUE).fail_open
    assert SessionRules(Half, Status.TEMPFAIL, timeout_status=Status.ACCEPT).fail_open
    assert not SessionRules(MilterSession, Status.CONTINUE).fail_open  # no on_eom
