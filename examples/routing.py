"""Recipient routing: copy to an archive, drop no-reply recipients, rewrite the envelope sender.

At end of message (`on_eom`), from the envelope collected at MAIL FROM and RCPT TO:

* **archive**: for every recipient listed in `archive` (e.g. `sales@example.com`), the
  archive address (`archive@example.com`) is added as a recipient (`add_recipient`), once;
* **drop**: recipients whose local part is in `drop_local_parts` (`noreply`, `no-reply`,
  `donotreply`) are removed (`remove_recipient`); a message for nobody else is discarded;
* **sender**: an envelope sender in a domain of `sender_domains` (`legacy.example.net` ->
  `example.com`) is rewritten to the new domain with the same local part (`change_sender`),
  keeping the RET and ENVID parameters of the original MAIL FROM (the only ones Postfix
  honours there).

Addresses are compared without angle brackets and case-insensitively; the recipient passed to
`remove_recipient` is exactly the one the MTA gave (brackets included), as libmilter requires.

The three tables are settings (`RoutingConfig`): the defaults below, or the `[filter]` table of
a config file (`examples/routing.toml`).

Run it:  pymilterkit run examples.routing:Routing --socket unix:/tmp/routing.sock
or:      pymilterkit run --config examples/routing.toml
or:      python examples/routing.py [SOCKET]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, Milter, MilterSession, Status


def bare(address: str) -> str:
    """`<Bob@Example.COM>` -> `bob@example.com`."""
    return address.strip().removeprefix("<").removesuffix(">").lower()


@dataclass(frozen=True)
class RoutingConfig:
    """The settings of `Routing` (the `[filter]` table of a config file)."""

    archive: Mapping[str, str] = field(
        default_factory=lambda: {"sales@example.com": "archive@example.com"}
    )
    """Recipient -> archive address added as a further recipient."""
    drop_local_parts: frozenset[str] = frozenset({"noreply", "no-reply", "donotreply"})
    """Local parts of recipients to remove."""
    sender_domains: Mapping[str, str] = field(
        default_factory=lambda: {"legacy.example.net": "example.com"}
    )
    """Sender domain -> the domain it is rewritten to."""

    def __post_init__(self) -> None:
        # Compared with bare(): lower case, no brackets.
        object.__setattr__(self, "archive", {bare(k): bare(v) for k, v in self.archive.items()})
        object.__setattr__(
            self, "drop_local_parts", frozenset(p.lower() for p in self.drop_local_parts)
        )
        object.__setattr__(
            self, "sender_domains", {k.lower(): v for k, v in self.sender_domains.items()}
        )


class Routing(MilterSession):
    """Adds archive recipients, removes no-reply recipients, rewrites legacy senders."""

    actions = Actions.ADD_RCPT | Actions.DELETE_RCPT | Actions.CHANGE_FROM
    config: ClassVar[RoutingConfig] = RoutingConfig()
    kept_sender_params: ClassVar[tuple[str, ...]] = ("RET", "ENVID")

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.sender = sender  # message-scoped: reset at each MAIL FROM
        self.sender_params = params
        self.recipients: list[str] = []
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        self.recipients.append(recipient)
        return Status.CONTINUE

    def new_sender(self) -> str | None:
        """The rewritten envelope sender, or None to keep it (the null sender is kept)."""
        address = bare(self.sender)
        local, at, domain = address.rpartition("@")
        domains = self.config.sender_domains
        if not at or domain not in domains:
            return None
        return f"{local}@{domains[domain]}"

    @override
    def on_eom(self) -> Status:
        config = self.config
        present = {bare(r) for r in self.recipients}
        dropped = [
            r for r in self.recipients if bare(r).partition("@")[0] in config.drop_local_parts
        ]
        added: list[str] = []
        for recipient in self.recipients:
            target = config.archive.get(bare(recipient))
            if target is not None and target not in present and target not in added:
                added.append(target)
        if len(dropped) == len(self.recipients) and not added:
            return Status.DISCARD  # nobody left who would read it

        for recipient in dropped:
            self.remove_recipient(recipient)
        for target in added:
            self.add_recipient(f"<{target}>")

        sender = self.new_sender()
        if sender is not None:
            kept = [
                key if value is None else f"{key}={value}"
                for key, value in self.sender_params.items()
                if key in self.kept_sender_params
            ]
            self.change_sender(f"<{sender}>", " ".join(kept) or None)
        return Status.CONTINUE


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    Milter(Routing, socket, name="Routing").run()
