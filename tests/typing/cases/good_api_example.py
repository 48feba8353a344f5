"""The filter from API.md, verbatim: it must pass mypy --strict."""

from typing_extensions import override
from pymilterkit import Actions, EsmtpParams, Milter, MilterSession, Status


class RcptCount(MilterSession):
    """Adds X-Rcpt-Count: <number of envelope recipients> to every message."""

    actions = Actions.ADD_HEADER

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.count = 0                      # message-scoped: reset at each MAIL FROM
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
    Milter(RcptCount, "inet:3000@localhost", name="RcptCountMilter").run()
