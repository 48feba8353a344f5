"""The filter of the HAProxy end-to-end tests and benchmark: the recipient counter, signed.

Each instance behind HAProxy runs `HaproxyTagged` with ``PMK_INSTANCE`` set to its name, so a
delivered message shows both the modification (``X-Rcpt-Count``) and which instance made it
(``X-Served-By``): the spread over the instances is read from the delivered mail itself, beside
HAProxy's own connection counts.
"""

from __future__ import annotations

import os

from typing_extensions import override

from examples.rcpt_count import RcptCount
from pymilterkit import Status


class HaproxyTagged(RcptCount):
    """`RcptCount`, plus ``X-Served-By: $PMK_INSTANCE`` on every message."""

    instance = os.environ.get("PMK_INSTANCE", "unnamed")

    @override
    def on_eom(self) -> Status:
        status = super().on_eom()
        self.add_header("X-Served-By", self.instance)
        return status
