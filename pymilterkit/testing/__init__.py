"""Test your filter: an in-process harness, an MTA-side client, and a milter process runner.

* `Harness(MyFilter).run(message, sender=..., recipients=[...])` drives a session class in this
  process with libmilter's rules and returns a `MessageResult`.
* `MilterClient("unix:/path").run(...)` does the same against any running milter over the
  wire protocol (version 6) and returns the same result types.
* `MilterProcess("module:Class")` runs a filter with the real runner in a child process.
* `apply_modifications(message, result)` gives the message the MTA would deliver.
* `Recording.load(path)` reads a `--record` file as harness input and recorded outcomes.

See docs/testing.md.
"""

from __future__ import annotations

from .._errors import MilterTimeout, ProtocolError
from ._apply import apply_envelope, apply_modifications
from ._client import MilterClient
from ._conversation import ALL_ACTIONS, ALL_PROTOCOL, MilterConnection
from ._envelope import ClientInfo, Envelope, Recipient
from ._harness import Harness
from ._process import MilterProcess
from ._recording import Outcome, Recording
from ._results import (
    Answer,
    BodyReplaced,
    ConnectionResult,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    MessageResult,
    Modification,
    Negotiation,
    Progress,
    Quarantined,
    RecipientAdded,
    RecipientRemoved,
    RecipientResult,
    Reply,
    SenderChanged,
    Step,
)

__all__ = [
    "ALL_ACTIONS",
    "ALL_PROTOCOL",
    "Answer",
    "BodyReplaced",
    "ClientInfo",
    "ConnectionResult",
    "Envelope",
    "Harness",
    "HeaderAdded",
    "HeaderChanged",
    "HeaderDeleted",
    "HeaderInserted",
    "MessageResult",
    "MilterClient",
    "MilterConnection",
    "MilterProcess",
    "MilterTimeout",
    "Modification",
    "Negotiation",
    "Outcome",
    "Progress",
    "ProtocolError",
    "Quarantined",
    "Recipient",
    "RecipientAdded",
    "RecipientRemoved",
    "RecipientResult",
    "Recording",
    "Reply",
    "SenderChanged",
    "Step",
    "apply_envelope",
    "apply_modifications",
]
