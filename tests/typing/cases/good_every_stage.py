"""Every stage method with its exact signature, and every session action, correctly typed."""
# mypy: enable-error-code="explicit-override"

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv6Address

from typing_extensions import override

from pymilterkit import (
    Actions,
    EsmtpParams,
    InetAddress,
    Milter,
    MilterError,
    MilterSession,
    ProtocolOpts,
    Stage,
    Status,
    UnixAddress,
    libmilter_version,
    noreply,
    run,
    set_debug_level,
    shutdown,
)

log = logging.getLogger(__name__)


class Everything(MilterSession):
    actions = (
        Actions.ADD_HEADER
        | Actions.CHANGE_HEADER
        | Actions.CHANGE_BODY
        | Actions.ADD_RCPT
        | Actions.ADD_RCPT_PAR
        | Actions.DELETE_RCPT
        | Actions.CHANGE_FROM
        | Actions.QUARANTINE
    )
    protocol = ProtocolOpts.SKIP | ProtocolOpts.HDR_LEADSPC
    requested_macros = {
        Stage.CONNECT: ("j", "{daemon_name}"),
        Stage.ENVFROM: ["{auth_authen}"],
        Stage.EOM: ("i",),
    }

    def __init__(self) -> None:
        self.client = "unknown"
        self.helo = ""
        self.sender = ""
        self.recipients: list[str] = []
        self.headers: list[tuple[str, str]] = []
        self.body_size = 0

    @override
    def on_negotiate(
        self, actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        status, wanted, wanted_opts = super().on_negotiate(actions, opts)
        if not actions & Actions.CHANGE_FROM:
            wanted &= ~Actions.CHANGE_FROM
        return status, wanted, wanted_opts

    @override
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        if isinstance(address, InetAddress):
            ip: IPv4Address | IPv6Address = address.ip
            self.client = f"{hostname} [{ip}]:{address.port}"
            if ip.is_loopback:
                return Status.ACCEPT
        elif isinstance(address, UnixAddress):
            self.client = address.path
        daemon: str | None = self.macro("{daemon_name}")
        log.debug("connect %s via %s", self.client, daemon or "?")
        return Status.CONTINUE

    @override
    def on_helo(self, hostname: str) -> Status:
        self.helo = hostname
        return Status.CONTINUE

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.sender = sender
        self.recipients = []
        self.headers = []
        self.body_size = 0
        size = params.get("SIZE")
        if size is not None and int(size) > 50_000_000:
            self.set_reply("552", "5.3.4", "Message too big for this filter")
            return Status.REJECT
        if "SMTPUTF8" in params and params["SMTPUTF8"] is None:
            log.debug("SMTPUTF8 from %s (%s)", sender, str(params))
        return Status.CONTINUE

    @override
    def on_rcpt(self, recipient: str, params: EsmtpParams) -> Status:
        if recipient.lower().startswith("<spamtrap@"):
            self.set_reply("550", "5.1.1", "No such user", "really")
            return Status.REJECT
        self.recipients.append(recipient)
        notify: str | None = params.get("NOTIFY")
        del notify
        return Status.CONTINUE

    @override
    def on_data(self) -> Status:
        return Status.CONTINUE

    @override
    def on_unknown(self, command: str) -> Status:
        self.set_reply("500", None, f"unknown command {command!r}")
        return Status.REJECT

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers.append((name, value))
        return Status.CONTINUE

    @override
    def on_eoh(self) -> Status:
        return Status.CONTINUE

    @override
    def on_body(self, chunk: bytes) -> Status:
        self.body_size += len(chunk)
        return Status.SKIP if self.body_size > 1_000_000 else Status.CONTINUE

    @override
    def on_eom(self) -> Status:
        queue_id = self.macro("i") or "NOQUEUE"
        self.progress()
        self.add_header("X-Queue-Id", queue_id)
        self.add_header(b"X-Raw", b"\xff bytes are fine")
        self.insert_header(0, "X-First", "yes")
        self.change_header("Subject", "[checked] something", index=1)
        self.change_header("X-Spam-Flag", None)
        self.change_sender("<bounces@example.org>", "SIZE=100")
        self.change_sender(b"<bounces@example.org>")
        self.add_recipient("<archive@example.org>")
        self.add_recipient("<copy@example.org>", "NOTIFY=NEVER")
        self.remove_recipient(self.recipients[0] if self.recipients else "<x@example.org>")
        self.replace_body(b"replaced\r\n")
        self.replace_body(b"appended\r\n")
        if self.body_size == 0:
            self.quarantine("empty body")
        return Status.CONTINUE

    @override
    def on_abort(self) -> None:
        self.recipients = []

    @override
    def on_close(self) -> None:
        log.debug("closed %s", self.client)


class CollectOnly(MilterSession):
    """Stages that only collect data, negotiated as no-reply."""

    @override
    @noreply
    def on_connect(self, hostname: str, address: InetAddress | UnixAddress | None) -> Status:
        return Status.NOREPLY

    @noreply
    @override
    def on_header(self, name: str, value: str) -> Status:
        return Status.CONTINUE

    @override
    @noreply
    def on_body(self, chunk: bytes) -> Status:
        return Status.NOREPLY


def main() -> None:
    major, minor, patch = libmilter_version()
    log.info("libmilter %d.%d.%d", major, minor, patch)
    set_debug_level(0)
    try:
        Milter(
            Everything,
            "unix:/run/everything.sock",
            name="Everything",
            timeout=600,
            backlog=64,
            debug_level=1,
            error_status=Status.TEMPFAIL,
            workers=4,
            socket_mode=0o660,
            socket_group="postfix",
            user="nobody",
            group=65534,
        ).run()
    except MilterError as exc:
        log.error("milter failed: %s", exc)
    run(CollectOnly, "inet:3001@localhost", workers=2)
    shutdown()
    spec = Everything.negotiation()
    assert spec.actions & Actions.ADD_HEADER
    assert Stage.EOM in spec.macros


if __name__ == "__main__":
    main()
