"""A filter for tests/integration/test_systemd.py: it shows what its process inherited."""

from __future__ import annotations

import os

from typing_extensions import override

from examples.rcpt_count import RcptCount
from pymilterkit import Actions, Status

SYSTEMD_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC")


class EnvReport(RcptCount):
    """RcptCount, plus `X-Systemd-Env:` the systemd variables this process still sees
    ("none" if it sees none) and `X-Pid:` the process that served the message."""

    actions = Actions.ADD_HEADER

    @override
    def on_eom(self) -> Status:
        seen = [f"{var}={os.environ[var]}" for var in SYSTEMD_VARS if var in os.environ]
        self.add_header("X-Systemd-Env", " ".join(seen) or "none")
        self.add_header("X-Pid", str(os.getpid()))
        return super().on_eom()
