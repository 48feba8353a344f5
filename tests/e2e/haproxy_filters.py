"""The filter of the HAProxy end-to-end tests and benchmark: the recipient counter, signed.

Each instance behind HAProxy runs `HaproxyTagged` with ``PMK_INSTANCE`` set to its name, so a
delivered message shows the modification (``X-Rcpt-Count``), which instance made it
(``X-Served-By``): the spread over the instances is read from the delivered mail itself, beside
HAProxy's own connection counts), and the SMTP client's address as the milter protocol gave it
(``X-Smtp-Client``: the client's, not HAProxy's, with no PROXY protocol).
"""

from __future__ import annotations

import os

from typing_extensions import override

from examples.rcpt_count import RcptCount
from pymilterkit import InetAddress, Status, UnixAddress


class HaproxyTagged(RcptCount):
    """`RcptCount`, plus ``X-Served-By: $PMK_INSTANCE`` and ``X-Smtp-Client: <client IP>``."""

    instance = os.environ.get("PMK_INSTANCE", "unnamed")

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.client = str(address.ip) if isinstance(address, InetAddress) else str(address)
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        status = super().on_eom()
        self.add_header("X-Served-By", self.instance)
        self.add_header("X-Smtp-Client", self.client)
        return status
