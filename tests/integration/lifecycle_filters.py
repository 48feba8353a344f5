"""Filters for the lifecycle tests: drain, reload, recycling.

`Generation` adds `X-Generation` (read from $PMK_GENERATION_FILE when the module is imported, so
a reload that imports the module afresh answers with the file's new content) and `X-Worker` (the
serving process). A sender `sleep-S@...` makes on_eom take S seconds: a message in flight.
With $LIFECYCLE_LOG set, on_close and on_eom are noted there ("pid eom", "pid close"); with
$PMK_LEAK_MARK set, each process importing it holds an inheritable descriptor of its own; while
the file $PMK_FAIL_START names exists, on_worker_start raises (a backend that went down).
"""

from __future__ import annotations

import os
import time

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, MilterSession, Status
from tests.helpers import append_line, local_part, requested_sleep


def _generation() -> str:
    path = os.environ.get("PMK_GENERATION_FILE")
    if not path:
        return "0"
    with open(path) as f:
        text = f.read().strip()
    if text == "broken":
        raise RuntimeError("this generation does not import")
    return text


GENERATION = _generation()

if os.environ.get("PMK_LEAK_MARK"):  # a descriptor left inheritable, as a C library may leave one
    os.set_inheritable(
        os.open(f"{os.environ['PMK_GENERATION_FILE']}.fd.{os.getpid()}", os.O_CREAT | os.O_WRONLY),
        True,
    )


def _note(line: str) -> None:
    append_line("LIFECYCLE_LOG", f"{os.getpid()} {line}")


class Generation(MilterSession):
    """Accepts every message, naming the code generation and the process that answered."""

    actions = Actions.ADD_HEADER
    delay = 0.0

    @override
    @classmethod
    def on_worker_start(cls) -> None:
        marker = os.environ.get("PMK_FAIL_START")
        if marker and os.path.exists(marker):
            raise RuntimeError("backend down")

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.delay = requested_sleep(local_part(sender)) or 0.0
        return Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        if self.delay:
            time.sleep(self.delay)
        self.add_header("X-Generation", GENERATION)
        self.add_header("X-Worker", str(os.getpid()))
        _note("eom")
        return Status.ACCEPT

    @override
    def on_close(self) -> None:
        _note("close")
