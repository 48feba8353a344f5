"""Filters for the metrics and dry-run tests, each run in its own process (`pymilterkit run`).

`Verdicts` decides from the envelope, so one process serves every case of a test:
a recipient `reject*` is refused (with a reply), `boom*` makes on_rcpt raise, `drain*` calls
the drain hook (`_metrics.set_draining`); a sender `spam*` is rejected at eom, `invalid*` makes
on_eom call add_header with an invalid name and `undeclared*` call quarantine, which the class
does not declare. Every message gets X-Rcpt-Count, X-Worker (the serving PID) and X-Prometheus
(whether prometheus_client is imported in the serving process), and its Subject changed.
"""

from __future__ import annotations

import logging
import os
import sys

from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    MilterSession,
    Stage,
    Status,
    UnixAddress,
    _metrics,
)
from tests.helpers import local_part


class Verdicts(MilterSession):
    """See the module docstring."""

    actions = Actions.ADD_HEADER | Actions.CHANGE_HEADER
    requested_macros = {Stage.EOM: ["i"]}

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.sender = sender
        self.count = 0
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        name = local_part(recipient)
        if name.startswith("reject"):
            self.set_reply("550", "5.7.1", "no such user here")
            return Status.REJECT
        if name.startswith("boom"):
            raise RuntimeError("boom recipient")
        if name.startswith("drain"):
            _metrics.set_draining()
        self.count += 1
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        sender = local_part(self.sender)
        if sender.startswith("invalid"):
            self.add_header("Bad Name", "x")  # raises InvalidArgumentError
        if sender.startswith("undeclared"):
            self.quarantine("held")  # raises UndeclaredActionError
        self.add_header("X-Rcpt-Count", str(self.count))
        self.add_header("X-Worker", str(os.getpid()))
        loaded = "loaded" if "prometheus_client" in sys.modules else "absent"
        self.add_header("X-Prometheus", loaded)
        self.change_header("Subject", "[checked]")
        if sender.startswith("spam"):
            return Status.REJECT
        return Status.CONTINUE


class ModuleLogs(MilterSession):
    """Logs at INFO through its module's logger and through a library-like one, at connect."""

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        logging.getLogger(__name__).info("filter record from %s", hostname)
        logging.getLogger("somelibrary.http").info("library record")
        return Status.CONTINUE
