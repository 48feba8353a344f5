"""One mixin, two filters: `AuditMixin` adds an `X-Audit` header to whatever filter uses it.

`AuditMixin` is a plain `MilterSession` subclass that brings its own class-level configuration:
its `actions` (ADD_HEADER) and `requested_macros` (the queue id `i` at end of message, the
MTA's name `j` at connect) are merged with those of the filter it is mixed into, and its
`on_connect`/`on_eom` cooperate with the filter's through `super()`. They are sync, as the
filters they wrap: `sync_answer` narrows what `super()` returns (a `StageResult`: a Status, or
an awaitable from an `async def` method) to the Status a sync method can use; wrapping an
async filter takes an `async def` mixin that awaits it. After the filter's own
`on_eom` has let the message through (CONTINUE or ACCEPT) it adds::

    X-Audit: <Filter> on <MTA name> queue-id=<queue id>; client=<host name> [<address>]

It is reused, unchanged, by two filters of the other examples:

* `AuditedTagger`  = `AuditMixin` + `examples.tagger.Tagger`
* `AuditedRouting` = `AuditMixin` + `examples.routing.Routing`

Run one:  pymilterkit run examples.mixins:AuditedTagger --socket unix:/tmp/tagger.sock
          pymilterkit run examples.mixins:AuditedRouting --socket unix:/tmp/routing.sock
or:       python -m examples.mixins [SOCKET] [tagger|routing]
"""

from __future__ import annotations

import sys

from typing_extensions import override

from examples.routing import Routing
from examples.tagger import Tagger
from pymilterkit import (
    Actions,
    InetAddress,
    Milter,
    MilterSession,
    Stage,
    StageResult,
    Status,
    UnixAddress,
)

AUDIT_HEADER = "X-Audit"


def sync_answer(result: StageResult) -> Status:
    """The answer of a sync stage method called through `super()`."""
    if not isinstance(result, Status):
        raise TypeError("AuditMixin wraps sync stage methods; use an async mixin for async ones")
    return result


class AuditMixin(MilterSession):
    """Adds `X-Audit: <filter> on <MTA> queue-id=<id>; client=<host> [<addr>]` at eom.

    Put it first in the bases (`class Audited(AuditMixin, MyFilter)`), so its stage methods
    wrap the filter's.
    """

    actions = Actions.ADD_HEADER
    requested_macros = {Stage.CONNECT: ["j"], Stage.EOM: ["i"]}

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        if isinstance(address, InetAddress):
            where = f"[{address.ip}]"
        elif isinstance(address, UnixAddress):
            where = f"[unix:{address.path}]"
        else:
            where = "[unknown]"
        self.audit_client = f"{hostname} {where}"
        self.audit_mta = self.macro("j") or "unknown"
        return sync_answer(super().on_connect(hostname, address))

    def audit_value(self) -> str:
        """The X-Audit header value for the current message."""
        queue_id = self.macro("i") or "unknown"
        return (
            f"{type(self).__name__} on {self.audit_mta} queue-id={queue_id}; "
            f"client={self.audit_client}"
        )

    @override
    def on_eom(self) -> Status:
        status = sync_answer(super().on_eom())  # the filter's own end of message first
        if status in (Status.CONTINUE, Status.ACCEPT):
            self.add_header(AUDIT_HEADER, self.audit_value())
        return status


class AuditedTagger(AuditMixin, Tagger):
    """The tagger (`examples.tagger`), audited."""


class AuditedRouting(AuditMixin, Routing):
    """The recipient router (`examples.routing`), audited."""


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    which = sys.argv[2] if len(sys.argv) > 2 else "tagger"
    Milter(AuditedRouting if which == "routing" else AuditedTagger, socket).run()
