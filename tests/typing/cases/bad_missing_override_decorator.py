"""With mypy's `explicit-override` check on, every stage method must carry @override.

Then a misspelt stage method cannot hide: written with @override it is an error (see
bad_misspelt_override.py), and written without it, the correctly spelt ones stand out.
"""
# mypy: enable-error-code="explicit-override"

from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status


class NoDecorator(MilterSession):
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:  # E: explicit-override
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        return Status.CONTINUE
