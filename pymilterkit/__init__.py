"""pymilterkit: typed, testable mail filters (milters) on the real libmilter.

Subclass `MilterSession`, override the stage methods you need, and run it with `Milter`.
Importing this package does not load libmilter; running does.
"""

from __future__ import annotations

from ._errors import (
    ActionError,
    ConfigurationError,
    InvalidArgumentError,
    LibmilterError,
    LibraryNotFoundError,
    MilterError,
    MilterTimeout,
    ProtocolError,
    SocketSpecError,
    StageResultError,
    UndeclaredActionError,
    WorkerStartError,
    WrongStageError,
)
from ._flags import Actions, ProtocolOpts, Stage, Status
from ._message import Message
from ._record import RecordOptions
from ._runner import Milter, libmilter_version, run, set_debug_level, shutdown
from ._session import ClassSpec, MilterSession, StageResult, noreply
from ._types import EsmtpParams, InetAddress, UnixAddress
from ._version import __version__

__all__ = [
    "ActionError",
    "Actions",
    "ClassSpec",
    "ConfigurationError",
    "EsmtpParams",
    "InetAddress",
    "InvalidArgumentError",
    "LibmilterError",
    "LibraryNotFoundError",
    "Message",
    "Milter",
    "MilterError",
    "MilterSession",
    "MilterTimeout",
    "ProtocolError",
    "ProtocolOpts",
    "RecordOptions",
    "SocketSpecError",
    "Stage",
    "StageResult",
    "StageResultError",
    "Status",
    "UndeclaredActionError",
    "UnixAddress",
    "WorkerStartError",
    "WrongStageError",
    "__version__",
    "libmilter_version",
    "noreply",
    "run",
    "set_debug_level",
    "shutdown",
]
