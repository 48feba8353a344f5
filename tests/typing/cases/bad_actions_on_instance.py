"""Setting `actions` per instance: it is class-level configuration, negotiated per class."""

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, MilterSession, Status


class ActionsAtRuntime(MilterSession):
    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.actions = Actions.ADD_HEADER  # E: misc
        return Status.CONTINUE
