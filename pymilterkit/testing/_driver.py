"""What the harness and the client have in common: run messages, return typed results."""

from __future__ import annotations

import abc
from collections.abc import Iterable

from .._flags import Actions, ProtocolOpts
from . import _wire as w
from ._conversation import ALL_ACTIONS, ALL_PROTOCOL, Endpoint, MilterConnection, run_connection
from ._envelope import ClientInfo, Envelope, MessageInput, Recipient
from ._results import ConnectionResult, MessageResult

__all__ = ["MessageSpec", "MtaDriver"]

MessageSpec = tuple[Envelope, MessageInput] | MessageInput
"""A message with its envelope, or just a message (sent with the default envelope)."""


class MtaDriver(abc.ABC):
    """Runs whole conversations through an endpoint; see `Harness` and `MilterClient`.

    `actions`, `protocol` and `version` are what the MTA offers in the negotiation (default:
    everything, like Postfix 3.7); `client` describes the SMTP client of each connection.
    """

    def __init__(
        self,
        *,
        actions: Actions = ALL_ACTIONS,
        protocol: ProtocolOpts = ALL_PROTOCOL,
        version: int = w.PROTOCOL_VERSION,
        client: ClientInfo | None = None,
    ) -> None:
        self.actions = actions
        self.protocol = protocol
        self.version = version
        self.client = client or ClientInfo()

    @abc.abstractmethod
    def _endpoint(self) -> Endpoint:
        """A fresh endpoint: a new milter connection."""

    def _finish(self, result: ConnectionResult, endpoint: Endpoint) -> ConnectionResult:
        return result

    def open(self) -> MilterConnection:
        """A new milter connection, not yet negotiated, for driving commands one by one."""
        return MilterConnection(
            self._endpoint(), actions=self.actions, protocol=self.protocol, version=self.version
        )

    def run_connection(
        self, messages: Iterable[MessageSpec] = (), *, client: ClientInfo | None = None
    ) -> ConnectionResult:
        """One connection: negotiate, connect, HELO, every message in turn, quit."""
        pairs: list[tuple[Envelope, MessageInput]] = []
        for item in messages:
            if isinstance(item, tuple):
                pairs.append(item)
            else:
                pairs.append((Envelope(), item))
        endpoint = self._endpoint()
        conn = MilterConnection(
            endpoint, actions=self.actions, protocol=self.protocol, version=self.version
        )
        result = run_connection(conn, client or self.client, pairs)
        return self._finish(result, endpoint)

    def run(
        self,
        message: MessageInput,
        *,
        sender: str = "sender@example.net",
        recipients: Iterable[str | Recipient] | str = ("rcpt@example.org",),
        sender_params: str = "",
        envelope: Envelope | None = None,
        client: ClientInfo | None = None,
    ) -> MessageResult:
        """One message on its own connection; returns its result.

        A verdict given at connect or HELO is reported as the message's verdict.
        """
        if envelope is None:
            envelope = Envelope.of(sender, recipients, sender_params=sender_params)
        result = self.run_connection([(envelope, message)], client=client)
        return result.messages[0]
