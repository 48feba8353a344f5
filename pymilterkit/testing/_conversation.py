"""The MTA side of a milter conversation, shared by the harness and the wire client.

`MilterConnection` is one milter connection seen from the MTA: it negotiates, sends one command
per method call and reads the answer; it skips stages negotiated away (SMFIP_NO_*), waits for no
answer of a no-reply stage (SMFIP_NR_*), and collects the modifications before the final answer
of end-of-message. It talks through an `Endpoint`: a socket (`_client`) or the in-process
engine (`_harness`), so both return equal results for a filter that behaves the same.

`run_connection` sequences it as Postfix 3.7 does: connect, HELO, unknown commands, then per
message MAIL, RCPT per recipient, DATA, headers, end of headers, body chunks (<= 65,535 bytes),
end of message and an abort (`A`). REJECT/TEMPFAIL at connect or HELO refuse the connection,
ACCEPT there stops filtering it, DISCARD there is ignored; at RCPT they refuse only that
recipient; elsewhere ACCEPT, DISCARD, REJECT or TEMPFAIL end the message. SKIP skips the rest of
the commands of the same kind. Macros go before each step that has them, even one negotiated
away.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

from .._errors import ProtocolError
from .._flags import Actions, ProtocolOpts, Status
from .._protocol import ALL_ACTIONS, ALL_PROTOCOL, ENDS_MESSAGE, REPLY_LETTER, STAGES
from .._types import InetAddress, UnixAddress
from . import _wire as w
from ._apply import apply_modifications
from ._envelope import (
    MACRO_STAGES,
    ClientInfo,
    Envelope,
    MessageInput,
    as_bytes,
    bracket,
    chunks,
    crlf_body,
    header_value_for_milter,
    normalize_macro_name,
    split_message,
)
from ._results import (
    Answer,
    ConnectionResult,
    MessageResult,
    Modification,
    Negotiation,
    RecipientResult,
    Reply,
    Step,
)

__all__ = [
    "ALL_ACTIONS",
    "ALL_PROTOCOL",
    "Endpoint",
    "MilterConnection",
    "run_connection",
]

_STEP_FLAGS: dict[Step, tuple[ProtocolOpts, ProtocolOpts]] = {
    Step(info.step): (info.off, info.noreply) for info in STAGES if info.off
}
_COMMAND_OF = {Step(info.step): info.command for info in STAGES}
_SIMPLE_STATUS = {letter: Status(status) for status, letter in REPLY_LETTER.items()}
_MESSAGE_ENDERS = ENDS_MESSAGE
_MAX_PACKETS_PER_ANSWER = 1_000_000


class Endpoint(Protocol):
    """Where packets go: a socket to a running milter, or the in-process engine."""

    def send(self, cmd: bytes, data: bytes, step: Step) -> None:
        """Send one packet; `step` names the command in error messages."""

    def receive(self, step: Step) -> w.Packet:
        """The next packet from the milter; raises ProtocolError/MilterTimeout naming `step`."""

    def close(self) -> None:
        """Hang up (the milter sees end of file)."""


class MilterConnection:
    """One milter connection, seen from the MTA: one method per protocol command.

    Each command method returns the milter's `Answer`, or None when the milter negotiated the
    stage away (nothing was sent). For a no-reply stage the answer's status is NOREPLY and
    nothing is read. Raises `ProtocolError` (or `MilterTimeout`) naming the stage when the
    milter misbehaves.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        actions: Actions = ALL_ACTIONS,
        protocol: ProtocolOpts = ALL_PROTOCOL,
        version: int = w.PROTOCOL_VERSION,
    ) -> None:
        self.endpoint = endpoint
        self.offered_actions = Actions(actions)
        self.offered_protocol = ProtocolOpts(protocol)
        self.version = version
        self.negotiation: Negotiation | None = None
        self.closed = False

    # -- plumbing ---------------------------------------------------------------------------

    def _negotiated(self) -> Negotiation:
        if self.negotiation is None:
            raise ProtocolError("negotiate() first: the milter has not been asked anything yet")
        return self.negotiation

    def _send(self, cmd: bytes, data: bytes, step: Step) -> None:
        if self.closed:
            raise ProtocolError(f"cannot send {step}: the connection is closed")
        self.endpoint.send(cmd, data, step)

    def skips(self, step: Step) -> bool:
        """True if the milter negotiated `step` away."""
        flags = _STEP_FLAGS.get(step)
        return flags is not None and bool(self._negotiated().protocol & flags[0])

    def no_reply(self, step: Step) -> bool:
        """True if the milter said it will not answer `step`."""
        flags = _STEP_FLAGS.get(step)
        return flags is not None and bool(self._negotiated().protocol & flags[1])

    def _command(self, step: Step, data: bytes, detail: str = "") -> Answer | None:
        self._negotiated()
        if self.skips(step):
            return None
        self._send(_COMMAND_OF[step], data, step)
        if self.no_reply(step):
            return Answer(step, Status.NOREPLY, None, (), detail)
        return self.read_answer(step, detail)

    def read_answer(self, step: Step, detail: str = "") -> Answer:
        """Read packets up to the milter's final answer to `step`."""
        mods: list[Modification] = []
        for _ in range(_MAX_PACKETS_PER_ANSWER):
            cmd, data = self.endpoint.receive(step)
            status = _SIMPLE_STATUS.get(cmd)
            if status is not None:
                if data:
                    raise ProtocolError(f"malformed {cmd!r} answer to {step}: unexpected data")
                return Answer(step, status, None, _merge_body(mods), detail)
            if cmd == w.REPLYCODE:
                if not data.endswith(b"\0"):
                    raise ProtocolError(f"malformed reply to {step}: not NUL-terminated")
                reply = Reply.parse(data[:-1])
                if reply.code[:1] not in ("4", "5"):
                    raise ProtocolError(f"malformed reply to {step}: {data[:80]!r}")
                status = Status.TEMPFAIL if reply.code[:1] == "4" else Status.REJECT
                return Answer(step, status, reply, _merge_body(mods), detail)
            if cmd == w.SHUTDOWN:
                reply = Reply("421", "4.7.0", ("Server closing connection",), False)
                return Answer(step, Status.TEMPFAIL, reply, _merge_body(mods), detail)
            if cmd == w.CONN_FAIL:
                return Answer(step, Status.TEMPFAIL, None, _merge_body(mods), detail)
            try:
                mods.append(w.decode_modification(cmd, data))
            except ProtocolError as exc:
                raise ProtocolError(f"{exc} (in the answer to {step})") from None
        raise ProtocolError(f"the milter sent more than {_MAX_PACKETS_PER_ANSWER} packets "
                            f"in its answer to {step}")

    # -- commands ---------------------------------------------------------------------------

    def negotiate(self) -> Negotiation:
        """Send OPTNEG with the offered version, actions and protocol steps; read the reply."""
        if self.negotiation is not None:
            raise ProtocolError("negotiate() was already called on this connection")
        data = w.encode_optneg(self.version, int(self.offered_actions),
                               int(self.offered_protocol))
        self._send(w.OPTNEG, data, Step.NEGOTIATE)
        cmd, reply = self.endpoint.receive(Step.NEGOTIATE)
        if cmd != w.OPTNEG:
            raise ProtocolError(f"expected a negotiation reply, got {cmd!r}")
        version, actions, protocol, macros = w.decode_optneg(reply)
        if version > self.version or version < 2:
            raise ProtocolError(f"the milter answered protocol version {version}; "
                                f"offered {self.version}")
        if actions & ~self.offered_actions:
            raise ProtocolError(
                f"the milter asks for actions {actions & ~self.offered_actions!r} "
                f"that were not offered"
            )
        if protocol & ~self.offered_protocol:
            raise ProtocolError(
                f"the milter asks for protocol options {protocol & ~self.offered_protocol!r} "
                f"that were not offered"
            )
        self.negotiation = Negotiation(
            version, actions, protocol, macros, self.offered_actions, self.offered_protocol
        )
        return self.negotiation

    def macros(self, step: Step, values: Mapping[str, str]) -> None:
        """Send macros for the command of `step` (nothing if `values` is empty)."""
        if not values:
            return
        if step not in MACRO_STAGES:
            raise ValueError(f"no macros are sent at {step}")
        self._send(w.MACRO, w.encode_macros(_COMMAND_OF[step], w.macro_pairs(values)),
                   Step(step))

    def connect(
        self, hostname: str | bytes, address: InetAddress | UnixAddress | None
    ) -> Answer | None:
        """CONNECT with the client's host name and address (None: unknown family)."""
        host = _raw(hostname)
        return self._command(Step.CONNECT, w.encode_connect(host, address), _text(host))

    def helo(self, name: str | bytes) -> Answer | None:
        raw = _raw(name)
        return self._command(Step.HELO, w.cstr(raw), _text(raw))

    def mail(self, sender: str | bytes, params: Sequence[str | bytes] | str = ()) -> Answer | None:
        """MAIL FROM: the address as given (an MTA uses angle brackets), then ESMTP args."""
        args = [_raw(sender), *(_raw(p) for p in _param_list(params))]
        return self._command(Step.MAIL, w.encode_argv(args), _text(args[0]))

    def rcpt(
        self, recipient: str | bytes, params: Sequence[str | bytes] | str = ()
    ) -> Answer | None:
        args = [_raw(recipient), *(_raw(p) for p in _param_list(params))]
        return self._command(Step.RCPT, w.encode_argv(args), _text(args[0]))

    def data(self) -> Answer | None:
        return self._command(Step.DATA, b"")

    def header(self, name: str | bytes, value: str | bytes) -> Answer | None:
        """One header, value exactly as given (see `split_message` for Postfix's form)."""
        raw_name, raw_value = _raw(name), _raw(value)
        return self._command(
            Step.HEADER, w.cstr(raw_name) + w.cstr(raw_value), _text(raw_name)
        )

    def eoh(self) -> Answer | None:
        return self._command(Step.EOH, b"")

    def body(self, chunk: bytes) -> Answer | None:
        """One body chunk (at most 65,535 bytes)."""
        if len(chunk) > w.MAX_DATA:
            raise ValueError(f"a body chunk is at most {w.MAX_DATA} bytes, got {len(chunk)}")
        return self._command(Step.BODY, bytes(chunk), f"{len(chunk)} bytes")

    def eom(self) -> Answer:
        """End of message; the answer carries the modifications."""
        self._negotiated()
        self._send(w.BODYEOB, b"", Step.EOM)
        return self.read_answer(Step.EOM)

    def unknown(self, command: str | bytes) -> Answer | None:
        raw = _raw(command)
        return self._command(Step.UNKNOWN, w.cstr(raw), _text(raw))

    def abort(self) -> None:
        """Abort the current message (no answer is read)."""
        self._send(w.ABORT, b"", Step.ABORT)

    def quit(self) -> None:
        """Say goodbye and hang up."""
        if not self.closed:
            try:
                self._send(w.QUIT, b"", Step.QUIT)
            finally:
                self.close()

    def quit_new_connection(self) -> None:
        """QUIT_NC: this SMTP connection ends, a new one follows on the same milter connection."""
        self._send(w.QUIT_NC, b"", Step.QUIT_NC)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.endpoint.close()


def _raw(value: str | bytes) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _param_list(params: Sequence[str | bytes] | str) -> list[str | bytes]:
    if isinstance(params, str):
        return list(params.split())
    return list(params)


def _merge_body(mods: list[Modification]) -> tuple[Modification, ...]:
    """Adjacent body packets (libmilter splits one replace_body into 64 KiB packets) as one."""
    from ._results import BodyReplaced

    out: list[Modification] = []
    for mod in mods:
        if isinstance(mod, BodyReplaced) and out and isinstance(out[-1], BodyReplaced):
            out[-1] = BodyReplaced(out[-1].body + mod.body)
        else:
            out.append(mod)
    return tuple(out)


# -- the MTA's sequencing ----------------------------------------------------------------------


def _macros_for(
    conn: MilterConnection,
    step: Step,
    tables: Sequence[Mapping[Step, Mapping[str, str]]],
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The macros to send at `step`: the step's own, or the milter's requested list."""
    own: dict[str, str] = {}
    for table in tables:
        own.update(table.get(step, {}))
    if extra:
        own.update(extra)
    wanted = conn._negotiated().macros.get(MACRO_STAGES[step])
    if wanted is None:
        return own
    everything: dict[str, str] = {}
    for table in tables:
        for values in table.values():
            everything.update(values)
    everything.update(own)
    out: dict[str, str] = {}
    for name in wanted:
        key = normalize_macro_name(name)
        if key in everything:
            out[name] = everything[key]
    return out


@dataclasses.dataclass
class _Verdict:
    status: Status
    step: Step
    reply: Reply | None


def _reply_for(answer: Answer) -> Reply | None:
    if answer.status in (Status.REJECT, Status.TEMPFAIL):
        return answer.reply or Reply.default(answer.status)
    return answer.reply


def run_connection(
    conn: MilterConnection,
    client: ClientInfo,
    messages: Sequence[tuple[Envelope, MessageInput]],
) -> ConnectionResult:
    """Negotiate, connect, HELO, each message, quit: the whole conversation of an MTA."""
    try:
        negotiation = conn.negotiate()
        client_macros = client.macro_table()
        verdict: _Verdict | None = None

        def connection_level(answer: Answer | None) -> _Verdict | None:
            if answer is None:
                return None
            if answer.status in (Status.REJECT, Status.TEMPFAIL):
                return _Verdict(answer.status, answer.step, _reply_for(answer))
            if answer.status is Status.ACCEPT:
                return _Verdict(Status.ACCEPT, answer.step, None)
            return None

        conn.macros(Step.CONNECT, _macros_for(conn, Step.CONNECT, [client_macros]))
        connect = conn.connect(client.hostname, client.address)
        verdict = connection_level(connect)
        helo: Answer | None = None
        if verdict is None and client.helo is not None:
            conn.macros(Step.HELO, _macros_for(conn, Step.HELO, [client_macros]))
            helo = conn.helo(client.helo)
            verdict = connection_level(helo)
        unknown: list[Answer] = []
        if verdict is None:
            for command in client.unknown:
                answer = conn.unknown(command)
                if answer is not None:
                    unknown.append(answer)
        results: list[MessageResult] = []
        for index, (envelope, message) in enumerate(messages):
            if verdict is not None:
                results.append(_connection_verdict_result(verdict, envelope, as_bytes(message)))
                continue
            raw = as_bytes(message)
            tables = [client_macros, envelope.macro_table(raw, index)]
            results.append(_run_message(conn, envelope, raw, tables))
            conn.abort()
        conn.quit()
    finally:
        conn.close()
    return ConnectionResult(negotiation, connect, helo, tuple(unknown), tuple(results))


def _connection_verdict_result(
    verdict: _Verdict, envelope: Envelope, raw: bytes
) -> MessageResult:
    rcpts = tuple(
        RecipientResult(r.address, r.params, verdict.status, verdict.reply)
        for r in envelope.recipients
    )
    delivered = raw if verdict.status is Status.ACCEPT else b""
    return MessageResult(verdict.status, verdict.step, verdict.reply, (), rcpts, (), raw, delivered)


def _run_message(
    conn: MilterConnection,
    envelope: Envelope,
    raw: bytes,
    tables: list[dict[Step, dict[str, str]]],
) -> MessageResult:
    answers: list[Answer] = []
    recipients: list[RecipientResult] = []
    skipping: Step | None = None

    def finish(status: Status, step: Step, reply: Reply | None) -> MessageResult:
        mods = tuple(m for a in answers for m in a.modifications)
        rest = tuple(
            RecipientResult(r.address, r.params, Status.CONTINUE)
            for r in envelope.recipients[len(recipients) :]
        )
        result = MessageResult(status, step, reply, mods, (*recipients, *rest), tuple(answers))
        spaced = bool(conn._negotiated().protocol & ProtocolOpts.HDR_LEADSPC)
        delivered = apply_modifications(raw, result, leading_space=spaced)
        delivered = delivered if result.status in (Status.CONTINUE, Status.ACCEPT) else b""
        return dataclasses.replace(result, original=raw, delivered=delivered)

    def ask(step: Step, answer: Answer | None) -> Answer | None:
        nonlocal skipping
        if answer is not None:
            answers.append(answer)
            if answer.status is Status.SKIP:
                skipping = step
        return answer

    def ended(step: Step, answer: Answer | None) -> MessageResult | None:
        """The message's result if `answer` ends it (at RCPT: see the loop)."""
        if (done := ask(step, answer)) is None or done.status not in _MESSAGE_ENDERS:
            return None
        return finish(done.status, step, _reply_for(done))

    def sends(step: Step) -> bool:
        """Postfix skips further events of the kind the milter answered SKIP to."""
        nonlocal skipping
        if skipping is step:
            return False
        skipping = None
        return True

    def macros(step: Step, extra: dict[str, str] | None = None) -> None:
        conn.macros(step, _macros_for(conn, step, tables, extra))

    sends(Step.MAIL)
    macros(Step.MAIL)
    if done := ended(Step.MAIL, conn.mail(bracket(envelope.sender), envelope.sender_params)):
        return done

    accepted = 0
    last_refusal: Answer | None = None
    for rcpt in envelope.recipients:
        if not sends(Step.RCPT):
            recipients.append(RecipientResult(rcpt.address, rcpt.params, Status.CONTINUE))
            accepted += 1
            continue
        macros(Step.RCPT, {"{rcpt_addr}": rcpt.address.strip("<>")}
               if envelope.default_macros else None)
        answer = ask(Step.RCPT, conn.rcpt(bracket(rcpt.address), rcpt.params))
        status = Status.CONTINUE if answer is None else answer.status
        reply = None if answer is None else _reply_for(answer)
        recipients.append(RecipientResult(rcpt.address, rcpt.params, status, reply))
        if status in (Status.REJECT, Status.TEMPFAIL):
            last_refusal = answer
            continue
        accepted += 1
        if status in _MESSAGE_ENDERS:
            return finish(status, Step.RCPT, reply)
    if envelope.recipients and accepted == 0 and last_refusal is not None:
        return finish(last_refusal.status, Step.RCPT, _reply_for(last_refusal))

    sends(Step.DATA)
    macros(Step.DATA)
    if done := ended(Step.DATA, conn.data()):
        return done

    headers, body = split_message(raw)
    leading_space = bool(conn._negotiated().protocol & ProtocolOpts.HDR_LEADSPC)
    for name, value in headers:
        if sends(Step.HEADER):
            value = header_value_for_milter(value, leading_space)
            if done := ended(Step.HEADER, conn.header(name, value)):
                return done

    sends(Step.EOH)
    macros(Step.EOH)
    if done := ended(Step.EOH, conn.eoh()):
        return done

    for chunk in chunks(crlf_body(body), w.MAX_DATA):
        if not sends(Step.BODY):
            break
        if done := ended(Step.BODY, conn.body(chunk)):
            return done

    sends(Step.EOM)
    macros(Step.EOM)
    answer = conn.eom()
    ask(Step.EOM, answer)
    status = Status.CONTINUE if answer.status is Status.SKIP else answer.status
    return finish(status, Step.EOM, _reply_for(answer))
