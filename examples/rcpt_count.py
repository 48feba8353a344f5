"""The recipient counter: adds `X-Rcpt-Count: <number of envelope recipients>` to each message.

Run it:  pymilterkit run examples.rcpt_count:RcptCount --socket unix:/tmp/rcpt.sock
or:      python examples/rcpt_count.py [SOCKET]
"""

from __future__ import annotations

import sys

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, Milter, MilterSession, Status


class RcptCount(MilterSession):
    """Adds X-Rcpt-Count: <number of envelope recipients> to every message."""

    actions = Actions.ADD_HEADER

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.count = 0  # message-scoped: reset at each MAIL FROM
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.count += 1
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Rcpt-Count", str(self.count))
        return Status.CONTINUE


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    Milter(RcptCount, socket, name="RcptCountMilter").run()
