"""Dry-run: the filter runs unchanged; its verdicts and modifications are logged, not sent.

For rolling a new filter out on live mail. Every stage method runs as usual and every action is
validated as usual (bad input raises the same `MilterError`), but:

* an answer other than CONTINUE (REJECT, TEMPFAIL, DISCARD, ACCEPT; also the error status after
  an exception) is logged and counted, and the MTA gets CONTINUE (SKIP and NOREPLY, which
  decide nothing about the mail, go through);
* every modification (headers, envelope, body, quarantine) and `set_reply` is logged and
  counted instead of reaching libmilter; `macro()` and `progress()` work as usual;
* the negotiation asks the MTA for no actions (only SETSYMLIST, when the filter requests
  macros: it changes nothing in the mail), so the MTA itself can see the filter cannot act.

The session's actions are still checked against what the class declares. Counts go to the
metrics (`pymilterkit_dry_run_*`) when they are on, and a summary is logged at stop.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from . import _metrics
from ._flags import Status
from ._protocol import ActionInfo, BackendWrapper, SessionBackend
from ._session import MilterSession

__all__ = ["DryRun", "DryRunBackend"]

logger = logging.getLogger("pymilterkit")

_VERDICTS = frozenset(
    (Status.REJECT, Status.DISCARD, Status.ACCEPT, Status.TEMPFAIL)
)
_CONTINUE = Status.CONTINUE


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "surrogateescape")


class DryRunTally:
    """What a process would have done: counts by what, for the summary at stop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def summary(self) -> str:
        with self.lock:
            items = sorted(self.counts.items())
        return ", ".join(f"{what} x{n}" for what, n in items) or "nothing"


class DryRunBackend(BackendWrapper):
    """A session backend that logs and counts modifications instead of carrying them out."""

    __slots__ = ("reply", "session", "tally")

    def __init__(self, inner: SessionBackend, tally: DryRunTally) -> None:
        super().__init__(inner)
        self.tally = tally
        self.session: MilterSession | None = None
        """The session (its records carry its id, queue id and client)."""
        self.reply: str | None = None
        """The reply `set_reply` would have set (shown with the verdict it goes with)."""

    def act(self, action: ActionInfo, *args: Any) -> None:
        if action.label == "progress":
            self.perform(action)  # changes nothing in the mail; keeps the MTA waiting
            return
        detail = _describe(action, args)
        if action.label == "set_reply":
            self.reply = detail
        logger.info(
            "dry-run: would %s %s", action.label, detail, extra={"pmk_session": self.session}
        )
        self.tally.add(action.label)
        rec = _metrics.recorder()
        if rec is not None:
            rec.action(action.label, dry=True)


def _describe(action: ActionInfo, args: tuple[Any, ...]) -> str:
    """An action's arguments as the dry-run log shows them (`Name: value`, `#2 Name: value`)."""
    if action.label == "replace_body":
        return f"({len(args[0])} bytes)"
    if action.label == "set_reply":
        code, xcode, lines = args
        return " ".join(_text(part) for part in (code, xcode, *lines) if part)
    text = [_text(arg) if not isinstance(arg, int) else str(arg) for arg in args]
    return action.shows.format(*text).rstrip()


class DryRun:
    """Dry-run's part in the dispatch path (`SessionRules.dry_run`): verdicts become CONTINUE,
    modifications go to a `DryRunBackend`."""

    def __init__(self) -> None:
        self.tally = DryRunTally()

    def backend(self, inner: SessionBackend, session: MilterSession) -> DryRunBackend:
        """`session`'s backend: `inner` for macros and progress, the log for the rest."""
        dry = DryRunBackend(inner, self.tally)
        dry.session = session
        return dry

    def verdicts(
        self, stage: str, callback: Callable[..., int], sessions: Mapping[Any, MilterSession]
    ) -> Callable[..., int]:
        """`callback` (a sync stage's), answering CONTINUE where it answered a verdict."""
        verdicts, proceed, would = _VERDICTS, _CONTINUE, self.would_answer

        def dry(key: Any, a: Any = None, b: Any = None) -> int:
            answer = callback(key, a, b)
            if answer in verdicts:
                would(stage, answer, sessions.get(key))
                return proceed
            return answer

        return dry

    def verdict(self, stage: str, answer: int, session: MilterSession) -> int:
        """What to send for an async stage's `answer`."""
        if answer in _VERDICTS:
            self.would_answer(stage, answer, session)
            return _CONTINUE
        return answer

    def would_answer(self, stage: str, answer: int, session: MilterSession | None) -> None:
        """Log and count an answer dry-run does not send (it sends CONTINUE)."""
        try:
            status = Status(answer)
            backend = session._pmk_backend if session is not None else None
            reply = ""
            if isinstance(backend, DryRunBackend):
                if backend.reply is not None and status in (Status.REJECT, Status.TEMPFAIL):
                    reply = f" with reply {backend.reply!r}"
                backend.reply = None
            logger.info(
                "dry-run: would answer %s at %s%s; sent CONTINUE",
                status.name, stage.removeprefix("on_"), reply,
                extra={"pmk_session": session, "pmk_stage": stage},
            )
            self.tally.add(f"{status.name} at {stage.removeprefix('on_')}")
            rec = _metrics.recorder()
            if rec is not None:
                rec.dry_verdict(stage, answer)
        except Exception:
            logger.exception("dry-run: could not log a verdict")

    def summary(self) -> None:
        """Log what this process would have done (at stop)."""
        logger.info("dry-run: not sent: %s", self.tally.summary())
