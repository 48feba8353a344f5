"""on_negotiate returning only a Status instead of (Status, Actions, ProtocolOpts)."""

from typing_extensions import override

from pymilterkit import Actions, MilterSession, ProtocolOpts, Status


class NegotiateStatusOnly(MilterSession):
    @override
    def on_negotiate(self, actions: Actions, opts: ProtocolOpts) -> Status:  # E: override
        return Status.CONTINUE


class NegotiateSwapped(MilterSession):
    @override
    def on_negotiate(
        self, actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        status, acts, popts = super().on_negotiate(actions, opts)
        return status, popts, acts  # E: return-value
