"""A typed `config` dataclass and `self.log`: both pass `mypy --strict` with no ignores."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from typing_extensions import override

from pymilterkit import EsmtpParams, Milter, MilterSession, Status


@dataclasses.dataclass(frozen=True)
class LimitConfig:
    max_recipients: int = 50
    reply: str = "Too many recipients"


class Limit(MilterSession):
    config: ClassVar[LimitConfig] = LimitConfig()

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.count = 0
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.count += 1
        if self.count > self.config.max_recipients:
            self.log.info("%s: over the limit of %d", recipient, self.config.max_recipients)
            self.set_reply("452", "4.5.3", self.config.reply)
            return Status.TEMPFAIL
        return Status.CONTINUE

    @classmethod
    def limit(cls) -> int:
        return cls.config.max_recipients


def main() -> None:
    Milter(Limit, "unix:/tmp/limit.sock", config=LimitConfig(max_recipients=10)).run()
