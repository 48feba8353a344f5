"""Reusable mixins: each declares the actions, options and macros it needs; a filter combines them."""

from __future__ import annotations

from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    MilterSession,
    ProtocolOpts,
    Stage,
    Status,
    noreply,
)


class TagsSubject(MilterSession):
    actions = Actions.CHANGE_HEADER

    def tag_subject(self, subject: str | None) -> None:
        if subject is not None:
            self.change_header("Subject", "[tagged] " + subject)


class AddsHeaders(MilterSession):
    actions = Actions.ADD_HEADER
    requested_macros = {Stage.EOM: ["i"]}


class CountsRecipients(MilterSession):
    protocol = ProtocolOpts.RCPT_REJ
    requested_macros = {Stage.ENVRCPT: ("{rcpt_mailer}",)}

    def __init__(self) -> None:
        self.count = 0
        self.rejected = 0

    @override
    @noreply
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if self.macro("{rcpt_mailer}") == "error":
            self.rejected += 1
        else:
            self.count += 1
        return Status.CONTINUE


class CollectsSubject(MilterSession):
    def __init__(self) -> None:
        self.subject: str | None = None

    @override
    @noreply
    def on_header(self, name: str, value: str) -> Status:
        if name.lower() == "subject":
            self.subject = value
        return Status.CONTINUE


class Combined(CountsRecipients, CollectsSubject, AddsHeaders, TagsSubject):
    """actions: CHANGE_HEADER | ADD_HEADER (+ SETSYMLIST), protocol: RCPT_REJ."""

    def __init__(self) -> None:
        CountsRecipients.__init__(self)
        CollectsSubject.__init__(self)

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        status = super().on_rcpt(recipient, params)
        if self.count > 100:
            self.set_reply("452", "4.5.3", "Too many recipients")
            return Status.TEMPFAIL
        return status

    @override
    def on_eom(self) -> Status:
        self.add_header("X-Rcpt-Count", str(self.count))
        self.tag_subject(self.subject)
        return Status.CONTINUE


class Extended(Combined):
    actions = Actions.QUARANTINE

    @override
    def on_eom(self) -> Status:
        status = super().on_eom()
        if self.rejected:
            self.quarantine(f"{self.rejected} recipients were rejected")
        return status


def effective_actions(cls: type[MilterSession]) -> Actions:
    return cls.negotiation().actions


ALL = effective_actions(Extended) | effective_actions(Combined)
