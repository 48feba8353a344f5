"""A filter that journals every call, for the stop-under-load test (issue 19.6).

Each call writes `TOKEN B stage` when it begins and `TOKEN E stage` when it returns to the
file named by $PMK_JOURNAL (one O_APPEND write per line, so lines of concurrent threads do not
mix). TOKEN is the process id and a number given to the session at its first call; a session
that a late callback made would show up with a first call other than on_negotiate. RCPT and EOM
take a few milliseconds, so a stop meets stages in flight.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import TypeVar

from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    MilterSession,
    ProtocolOpts,
    Status,
    UnixAddress,
)
from tests.helpers import append_line

_T = TypeVar("_T")
_numbers = itertools.count(1)


def _slow_continue() -> Status:
    time.sleep(0.003)
    return Status.CONTINUE


class Journal(MilterSession):
    """Accepts every message; journals the begin and end of each call."""

    actions = Actions.ADD_HEADER

    def _call(self, stage: str, run: Callable[[], _T]) -> _T:
        token = self.__dict__.get("_token")
        if token is None:
            token = self.__dict__["_token"] = f"{os.getpid()}:{next(_numbers)}"
        append_line("PMK_JOURNAL", f"{token} B {stage}")
        try:
            return run()
        finally:
            append_line("PMK_JOURNAL", f"{token} E {stage}")

    @override
    def on_negotiate(
        self, actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        negotiate = super().on_negotiate
        return self._call("on_negotiate", lambda: negotiate(actions, opts))

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        return self._call("on_connect", lambda: Status.CONTINUE)

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        return self._call("on_mail", lambda: Status.CONTINUE)

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        return self._call("on_rcpt", _slow_continue)

    @override
    def on_header(self, name: str, value: str) -> Status:
        return self._call("on_header", lambda: Status.CONTINUE)

    @override
    def on_eom(self) -> Status:
        def eom() -> Status:
            _slow_continue()
            self.add_header("X-Journal", "yes")
            return Status.ACCEPT

        return self._call("on_eom", eom)

    @override
    def on_abort(self) -> None:
        self._call("on_abort", lambda: None)

    @override
    def on_close(self) -> None:
        self._call("on_close", lambda: None)
