"""The filter `benchmarks/lifecycle.py` runs: loadgen's X-Rcpt-Count answer, plus probes.

Every message gets `X-Rcpt-Count: <recipients>` (what loadgen checks). A sender
`generation@...` also gets `X-Generation` (read from $PMK_GENERATION_FILE when the module is
imported, so a reload shows when new code answers); a sender `sleep-S@...` makes on_eom take S
seconds (a message in flight during an event).
"""

from __future__ import annotations

import os
import time

from typing_extensions import override

from examples.rcpt_count import RcptCount
from pymilterkit import EsmtpParams, Status


def _generation() -> str:
    path = os.environ.get("PMK_GENERATION_FILE")
    if not path:
        return "0"
    with open(path) as f:
        return f.read().strip()


GENERATION = _generation()


class Probe(RcptCount):
    """The recipient counter; answers the probes described above."""

    local = ""

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.local = sender.strip("<>").split("@", 1)[0]
        return super().on_mail(sender, params)

    @override
    def on_eom(self) -> Status:
        if self.local.startswith("sleep-"):
            time.sleep(float(self.local[6:]))
        elif self.local == "generation":
            self.add_header("X-Generation", GENERATION)
        return super().on_eom()
