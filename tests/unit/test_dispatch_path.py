"""The one dispatch path (`SessionRules.stage_callback`), without libmilter.

libmilter's callbacks (`_trampolines.LibmilterCallbacks`) and the harness run the same
function; these tests drive it directly: session creation, the abort guard, the error policy,
the result check.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status
from pymilterkit._dispatch import SessionRules
from pymilterkit._trampolines import LibmilterCallbacks
from pymilterkit.testing import Harness


class Events(MilterSession):
    """Records its calls; the sender's local part says what MAIL answers."""

    events: list[str] = []

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.events.append(f"mail {sender}")
        return Status[sender.upper()] if sender.isalpha() else Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if recipient == "raise":
            raise RuntimeError("boom")
        if recipient == "garbage":
            return "no status"  # type: ignore[return-value]
        return Status.REJECT if recipient == "reject" else Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self.events.append("abort")


class Driver:
    """A `SessionRules` with one connection, keyed by None, as the harness keys it."""

    def __init__(self, error_status: Status = Status.TEMPFAIL) -> None:
        self.driver = SessionRules(Events, error_status)
        self.sessions: dict[Any, MilterSession] = {}
        self.created = 0
        self.callbacks = {
            stage: self.driver.stage_callback(stage, self.sessions, self.create, lambda *a: a)
            for stage in ("on_mail", "on_rcpt")
        }

    def create(self, key: Any) -> MilterSession:
        self.created += 1
        session = self.sessions[key] = self.driver.create(object())  # type: ignore[arg-type]
        return session

    def __call__(self, stage: str, *args: Any) -> int:
        return self.callbacks[stage](None, *args)

    def abort(self) -> None:
        self.driver.abort(self.sessions[None])


def setup_function() -> None:
    Events.events = []


def test_a_session_is_made_at_the_first_stage_and_kept() -> None:
    d = Driver()
    assert d("on_mail", "a@b", EsmtpParams()) == Status.CONTINUE
    assert d("on_rcpt", "x", EsmtpParams()) == Status.CONTINUE
    assert d.created == 1


def test_abort_runs_only_inside_a_message_and_once() -> None:
    d = Driver()
    d("on_mail", "a@b", EsmtpParams())
    d("on_rcpt", "reject", EsmtpParams())  # a refused recipient does not end the message
    d.abort()
    d.abort()
    assert Events.events == ["mail a@b", "abort"]
    Events.events.clear()
    d("on_mail", "reject", EsmtpParams())  # a refused sender ends it: nothing to abort
    d.abort()
    assert Events.events == ["mail reject"]


def test_errors_and_wrong_results_get_the_error_status() -> None:
    d = Driver(Status.REJECT)
    d("on_mail", "a@b", EsmtpParams())
    assert d("on_rcpt", "raise", EsmtpParams()) == Status.REJECT
    assert d("on_rcpt", "garbage", EsmtpParams()) == Status.REJECT
    assert d("on_rcpt", "fine", EsmtpParams()) == Status.CONTINUE


def test_refused_creation_while_stopping_answers_tempfail() -> None:
    driver = SessionRules(Events, Status.REJECT)
    callback = driver.stage_callback("on_mail", {}, lambda key: None,
                                     lambda *a: a)
    assert callback(None, "a@b", EsmtpParams()) == Status.TEMPFAIL
    assert Events.events == []


def test_libmilter_callbacks_and_the_harness_run_the_same_code() -> None:
    dispatcher = LibmilterCallbacks(Events, None, Status.TEMPFAIL, lambda exc: None)  # type: ignore[arg-type]
    harness = Harness(Events)
    harness.run(b"Subject: x\r\n\r\nbody\r\n", sender="a@b", recipients=["c@d"])
    runner_code = dispatcher._stage("on_rcpt", None).__code__
    shared_code = SessionRules(Events, Status.TEMPFAIL).stage_callback(
        "on_rcpt", {}, lambda key: None).__code__
    assert runner_code is shared_code
    assert Events.events[:1] == ["mail <a@b>"]  # the harness ran the filter through it too
