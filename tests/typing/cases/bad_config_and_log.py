"""Misusing the typed `config` and `self.log`: mypy sees the dataclass's fields."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status


@dataclasses.dataclass(frozen=True)
class LimitConfig:
    max_recipients: int = 50


class Limit(MilterSession):
    config: ClassVar[LimitConfig] = LimitConfig()

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if len(recipient) > self.config.max_recipents:  # E: attr-defined
            return Status.REJECT
        name: str = self.config.max_recipients  # E: assignment
        self.log.infoo(name)  # E: attr-defined
        return Status.CONTINUE


class WrongDefault(MilterSession):
    config: ClassVar[LimitConfig] = {"max_recipients": 3}  # E: assignment
