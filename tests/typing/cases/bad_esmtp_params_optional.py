"""Reading ESMTP parameters as if every value were a str: a bare keyword has the value None."""

from typing_extensions import override

from pymilterkit import EsmtpParams, MilterSession, Status


class SizeLimit(MilterSession):
    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        if int(params["SIZE"]) > 10_000_000:  # E: arg-type
            return Status.REJECT
        body: str = params.get("BODY", "7BIT")  # E: assignment
        return Status.CONTINUE if body else Status.TEMPFAIL
