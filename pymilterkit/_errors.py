"""The exception tree of pymilterkit.

    MilterError                       root: catch this to catch everything the library raises
    ├── LibraryNotFoundError          libmilter could not be loaded (names every path tried)
    ├── ConfigurationError            bad runner settings: socket spec, options, a second run
    │   └── SocketSpecError           a socket spec libmilter would not accept
    ├── InvalidArgumentError          (also ValueError) an argument that would corrupt the protocol:
    │                                 header names, CR/LF/NUL, reply codes, sizes
    ├── ActionError                   an action used where libmilter forbids it
    │   ├── WrongStageError           a message action outside on_eom
    │   └── UndeclaredActionError     an action whose flag is not in the class's `actions`
    ├── WorkerStartError              the filter's on_worker_start raised: nothing is served
    ├── StageResultError              (also TypeError) a stage method's result is not a Status
    │                                 (raised in tests with reraise=True; logged in production)
    ├── LibmilterError                libmilter answered MI_FAILURE (or failed to start)
    └── ProtocolError                 (pymilterkit.testing) the milter broke the wire protocol
        └── MilterTimeout             the milter did not answer in time
"""

from __future__ import annotations

__all__ = [
    "ActionError",
    "ConfigurationError",
    "InvalidArgumentError",
    "LibmilterError",
    "LibraryNotFoundError",
    "MilterError",
    "MilterTimeout",
    "ProtocolError",
    "SocketSpecError",
    "StageResultError",
    "UndeclaredActionError",
    "WorkerStartError",
    "WrongStageError",
]


class MilterError(Exception):
    """Root of every exception pymilterkit raises."""


class LibraryNotFoundError(MilterError):
    """libmilter could not be loaded; the message lists every place tried and the package."""


class ConfigurationError(MilterError):
    """The runner was given settings it cannot use, or libmilter refused them."""


class SocketSpecError(ConfigurationError):
    """A socket spec that libmilter would not accept (say `unix:/path` or `inet:PORT@HOST`)."""


class InvalidArgumentError(MilterError, ValueError):
    """An argument that would corrupt the protocol or a message; nothing was sent."""


class ActionError(MilterError):
    """A session action called where libmilter does not allow it; nothing was sent."""


class WrongStageError(ActionError):
    """A message action (header, recipient, body, ...) called outside `on_eom`."""


class UndeclaredActionError(ActionError):
    """An action whose flag is missing from the class's `actions` (so it was not negotiated)."""


class WorkerStartError(MilterError):
    """The filter's `on_worker_start` failed: the process does not serve (its cause is chained)."""


class StageResultError(MilterError, TypeError):
    """A stage method returned something that is not a `Status` (in a test with `reraise`)."""


class LibmilterError(MilterError):
    """libmilter reported a failure (MI_FAILURE) for a call."""


class ProtocolError(MilterError):
    """The milter on the other end of a test client broke the milter protocol."""


class MilterTimeout(ProtocolError):
    """The milter did not answer within the client's timeout."""
