"""A connection policy filter: refuses clients by address, host name or HELO name.

* at connect (`on_connect`): clients whose IP address is in `blocked_networks`, or whose
  (reverse DNS) host name matches one of `blocked_hostnames` (dial-up and dynamic pools), get
  a multi-line `550 5.7.1` reply; clients in `trusted_networks` are accepted without any
  further check (`Status.ACCEPT`);
* at HELO/EHLO (`on_helo`): a bare IP address instead of a name (or an address literal that
  is not the client's own), `localhost`, a name without a dot, or this MTA's own name (macro
  `j`) gets a multi-line `550 5.7.1` reply.

A rejection at connect or HELO is for the whole connection (libmilter's rule). Postfix
delays it, like `smtpd_delay_reject`: after a rejection at connect it greets with its own
`554 ... not accepting connections`; after one at HELO it answers EHLO normally; in both cases
every MAIL FROM of the connection then gets the filter's multi-line reply (a second EHLO does
not help). Sendmail refuses the connection or the HELO command directly.

Run it:  pymilterkit run examples.policy:ConnectionPolicy --socket unix:/tmp/policy.sock
or:      python examples/policy.py [SOCKET]
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import ClassVar

from typing_extensions import override

from pymilterkit import InetAddress, Milter, MilterSession, Stage, Status, UnixAddress

Network = IPv4Network | IPv6Network

POSTMASTER = "postmaster@example.com"


class ConnectionPolicy(MilterSession):
    """Rejects clients by address and host name at connect, and by HELO name at HELO."""

    requested_macros = {Stage.CONNECT: ["j"]}
    blocked_networks: ClassVar[Sequence[Network]] = (
        ip_network("203.0.113.0/24"),  # documentation ranges: replace with your own list
        ip_network("2001:db8:bad::/48"),
    )
    trusted_networks: ClassVar[Sequence[Network]] = ()
    blocked_hostnames: ClassVar[Sequence[re.Pattern[str]]] = (
        re.compile(r"(?i)(^|[.-])(dyn|dynamic|dialup|dsl|pool|dhcp|ppp)[0-9]*[.-]"),
    )

    def refuse(self, *lines: str) -> Status:
        """Reject with a multi-line 550 5.7.1 reply ending with whom to contact."""
        self.set_reply("550", "5.7.1", *lines, f"Contact {POSTMASTER} if this is a mistake.")
        return Status.REJECT

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        self.client_ip = address.ip if isinstance(address, InetAddress) else None
        self.mta_name = (self.macro("j") or "").lower()
        if self.client_ip is not None:
            if any(self.client_ip in net for net in self.trusted_networks):
                return Status.ACCEPT
            if any(self.client_ip in net for net in self.blocked_networks):
                return self.refuse(
                    f"Connections from {self.client_ip} are not accepted here.",
                    "This network is blocked by local policy.",
                )
        if any(pattern.search(hostname) for pattern in self.blocked_hostnames):
            return self.refuse(
                f"Host name {hostname} looks like a dynamic address.",
                "Please send through your provider's mail server.",
            )
        return Status.CONTINUE

    def helo_problem(self, name: str) -> str | None:
        """Why `name` is not acceptable as a HELO name, or None."""
        lowered = name.lower().rstrip(".")
        if lowered.startswith("[") and lowered.endswith("]"):
            try:
                literal = ip_address(lowered[1:-1].removeprefix("ipv6:"))
            except ValueError:
                return "is not a valid address literal"
            if self.client_ip is not None and literal != self.client_ip:
                return "is an address literal that is not your address"
            return None
        try:
            ip_address(lowered)
        except ValueError:
            pass
        else:
            return "is an IP address, not a host name"
        if lowered in ("localhost", "localhost.localdomain"):
            return "is not your host name"
        if "." not in lowered:
            return "is not a fully qualified host name"
        if self.mta_name and lowered == self.mta_name:
            return "is my name, not yours"
        return None

    @override
    def on_helo(self, hostname: str) -> Status:
        problem = self.helo_problem(hostname)
        if problem is None:
            return Status.CONTINUE
        return self.refuse(
            f"HELO {hostname} rejected: it {problem}.",
            "Use the fully qualified name of your mail server.",
        )


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    Milter(ConnectionPolicy, socket, name="ConnectionPolicy").run()
