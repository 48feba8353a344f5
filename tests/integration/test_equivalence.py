"""The fake stays honest: every scenario runs through the in-process harness and through the
real runner (libmilter, in a child process) driven by the wire client; the results must be
equal. Each scenario also checks a few facts, so equality of two wrong results cannot pass.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from pymilterkit import InetAddress, MilterSession, ProtocolOpts, Status, UnixAddress
from pymilterkit.testing import (
    ALL_PROTOCOL,
    Answer,
    ClientInfo,
    ConnectionResult,
    Envelope,
    Harness,
    HeaderAdded,
    MilterClient,
    MilterConnection,
    MilterProcess,
    Recipient,
    Step,
)

from . import filters as f

pytestmark = pytest.mark.integration

MODULE = "tests.integration.filters"

MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject: hello\r\n"
    b"X-Remove-Me: yes\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b"this is the body.\r\n"
)
BIG = b"Subject: big\r\n\r\n" + (b"0123456789" * 7 + b"\r\n") * 3000  # ~216 KB, 4 chunks
EIGHT_BIT = (
    "Subject: caf\u00e9 \u00fcber\r\nX-Latin1: ".encode()
    + b"\xe9t\xe9\r\n"
    + b"X-Folded: a\r\n\tb\r\n c\r\n\r\n"
    + "bödy ünïcode\r\n".encode()
    + b"latin1 \xff\xfe\r\n"
)

DEFAULT_CLIENT = ClientInfo()
Check = Callable[[ConnectionResult], None]
Script = Callable[[MilterConnection], list[object]]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    filter: type[MilterSession]
    client: ClientInfo = DEFAULT_CLIENT
    messages: tuple[tuple[Envelope, bytes], ...] = ((Envelope(), MESSAGE),)
    protocol: ProtocolOpts = ALL_PROTOCOL
    check: Check | None = None
    script: Script | None = None
    tcp: bool = False  # the runner on an inet socket (Harness(tcp=True))


def two_rcpts() -> Envelope:
    return Envelope.of("sender@example.net", ["good@example.org", "bad@example.org"])


def verdict_scenarios() -> Iterator[Scenario]:
    stages = ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom")
    for verdict in ("reject", "tempfail", "discard", "accept"):
        for stage in stages:
            status = Status[verdict.upper()]

            def check(result: ConnectionResult, status: Status = status, stage: str = stage,
                      verdict: str = verdict) -> None:
                first, second = result.messages
                if stage in ("connect", "helo") and status is Status.DISCARD:
                    # Postfix ignores DISCARD for the connection: both messages go through.
                    assert first.status is Status.CONTINUE and second.status is Status.CONTINUE
                elif stage == "rcpt" and status in (Status.REJECT, Status.TEMPFAIL):
                    assert first.status is Status.CONTINUE
                    assert [r.status for r in first.recipients] == [Status.CONTINUE, status]
                    assert first.header("X-Seen") is not None
                else:
                    assert first.status is status
                    assert first.stage is Step(stage)
                    if status in (Status.REJECT, Status.TEMPFAIL):
                        assert first.reply is not None and not first.reply.custom
                    if stage not in ("connect", "helo"):
                        # The second message starts fresh and gets to the end.
                        assert second.stage is Step(stage) or second.status is status

            yield Scenario(
                f"{verdict}-at-{stage}",
                f.VerdictAt,
                client=ClientInfo(hostname=f"{verdict}.{stage}"),
                messages=((two_rcpts(), MESSAGE), (two_rcpts(), BIG)),
                check=check,
            )


def check_every_action(result: ConnectionResult) -> None:
    (msg,) = result.messages
    assert msg.status is Status.CONTINUE
    assert msg.header("X-Inserted") == "at the top"
    assert msg.headers_added[1] == HeaderAdded("X-Folded", "first line\n\tsecond line")
    assert msg.headers_deleted[0].name == "X-Remove-Me"
    assert msg.sender_change is not None and msg.sender_change.params == "RET=HDRS"
    assert [r.params for r in msg.recipients_added] == [None, "NOTIFY=NEVER"]
    assert msg.new_body is not None and msg.new_body.endswith(b"\r\nappended\r\n")
    assert len(msg.new_body) == 10 + 70002 + 10
    assert msg.quarantine_reason == "held for review"
    assert msg.progress_count == 2


def check_shape(result: ConnectionResult, expected: str) -> None:
    (msg,) = result.messages
    assert msg.status is Status.CONTINUE and msg.header("X-Shape") == expected


SHAPES = (  # a message with no header lines once went unanswered after DATA
    ("no-headers", b"just a body\r\n", "0 13"),
    ("empty", b"", "0 0"),
    ("headers-only", b"Subject: x\r\nFrom: a@b\r\n", "2 0"),
    ("body-only", b"\r\nbody only\r\n", "0 11"),
)


def shape_scenarios() -> Iterator[Scenario]:
    """Each message shape through header-and-body filters, where the MTA sends DATA or not."""
    for filter_class, tcp, where in (
        (f.HeadersAndBody, False, ""),
        (f.HeadersAndBody, True, "-tcp"),
        (f.HeadersBodyAndRcpt, True, "-rcpt-tcp"),
        (f.HeadersBodyAndData, False, "-data"),
    ):
        for name, message, shape in SHAPES:
            yield Scenario(f"shape-{name}{where}", filter_class, tcp=tcp,
                           messages=((Envelope(), message),),
                           check=functools.partial(check_shape, expected=shape))


def check_replies(case: str) -> Check:
    def check(result: ConnectionResult) -> None:
        msgs = result.messages
        if case == "connect":
            assert result.connect is not None and result.connect.reply is not None
            assert str(result.connect.reply) == "554 5.7.1 go away"
            assert all(m.status is Status.REJECT and m.stage is Step.CONNECT for m in msgs)
        elif case == "mail":
            assert msgs[0].reply is not None
            assert msgs[0].reply.lines == ("sender refused: 100% sure",)
            assert msgs[1].status is Status.CONTINUE
        elif case == "noxcode":
            assert msgs[0].reply is not None and msgs[0].reply.xcode is None
        elif case == "rcpt":
            bad = msgs[0].recipients[1]
            assert bad.status is Status.TEMPFAIL and bad.reply is not None
            assert (bad.reply.code, bad.reply.xcode) == ("450", "4.2.0")
        elif case == "multiline":
            assert msgs[0].reply is not None
            assert msgs[0].reply.lines == ("first line", "second line", "third line")
        elif case == "mismatch":
            bad = msgs[0].recipients[1]
            assert bad.status is Status.REJECT and bad.reply is not None
            assert not bad.reply.custom
            # The kept 4xx text comes out with the TEMPFAIL at end of message.
            assert msgs[0].status is Status.TEMPFAIL and msgs[0].reply is not None
            assert msgs[0].reply.lines == ("kept for later",)
        elif case == "bare":
            assert msgs[0].reply is not None and msgs[0].reply.code == "550"
    return check


def reply_scenarios() -> Iterator[Scenario]:
    for case in ("connect", "mail", "noxcode", "rcpt", "multiline", "mismatch", "bare"):
        envs = (
            (Envelope.of("bad@example.net", ["good@example.org", "bad@example.org"]), MESSAGE),
            (Envelope.of("good@example.net", ["good@example.org"]), MESSAGE),
        )
        yield Scenario(f"reply-{case}", f.RepliesByStage, client=ClientInfo(hostname=case),
                       messages=envs, check=check_replies(case))


def check_noreply(result: ConnectionResult) -> None:
    (msg,) = result.messages
    assert msg.status is Status.CONTINUE
    assert msg.header("X-Rcpts") == "<good@example.org> <bad@example.org>"
    assert msg.header("X-Headers", ).startswith("From=Sender")  # type: ignore[union-attr]
    steps = [(a.step, a.status) for a in msg.answers]
    assert (Step.HEADER, Status.NOREPLY) in steps and (Step.RCPT, Status.NOREPLY) in steps


def check_skip_body(result: ConnectionResult) -> None:
    (msg,) = result.messages
    assert msg.header("X-Chunks") == "1"
    assert [a.step for a in msg.answers].count(Step.BODY) == 1


def check_skip_headers(result: ConnectionResult) -> None:
    (msg,) = result.messages
    assert msg.header("X-Header-Names") == "From,To"


def check_aborts(result: ConnectionResult) -> None:
    first, second, third, fourth = result.messages
    assert first.status is Status.REJECT and first.stage is Step.MAIL
    assert second.status is Status.TEMPFAIL and second.stage is Step.DATA
    assert third.status is Status.CONTINUE
    # Message 2 was aborted after its TEMPFAIL at DATA? No: a verdict ends the transaction
    # in libmilter, so abort is not called; nor for message 1.
    assert third.header("X-Aborts") == "0" and third.header("X-Messages") == "3"
    assert fourth.header("X-Aborts") == "0" and fourth.header("X-Messages") == "4"


def check_faulty(result: ConnectionResult) -> None:
    statuses = [(m.status, m.stage) for m in result.messages]
    assert statuses == [
        (Status.TEMPFAIL, Step.MAIL),
        (Status.TEMPFAIL, Step.HEADER),
        (Status.TEMPFAIL, Step.EOM),
        (Status.TEMPFAIL, Step.EOM),
        (Status.CONTINUE, Step.EOM),
    ]
    # What was sent before the exception is kept, as with libmilter.
    assert result.messages[3].header("X-Before") == "error"


def check_unknown(result: ConnectionResult) -> None:
    assert [a.status for a in result.unknown] == [Status.CONTINUE, Status.REJECT]
    assert result.unknown[1].reply is not None
    assert result.messages[0].header("X-Ok") == "1"


def check_macros(result: ConnectionResult) -> None:
    values = [h.value for h in result.messages[0].headers_added]
    assert "j=mx.example.org" in values and "{j}=mx.example.org" in values
    assert "{rcpt_addr}=rcpt@example.org" in values
    assert "{mail_addr}=sender@example.net" in values
    assert "v=None" in values  # not requested, so not sent


def check_raw(result: ConnectionResult) -> None:
    msg = result.messages[0]
    headers = [h.value for h in msg.headers_added if h.name == "X-Header"]
    assert headers[1] == "X-Latin1:\udce9t\udce9"
    assert headers[2] == "X-Folded:a\n\tb\n c"
    assert msg.new_body is not None and b"\xff\xfe" in msg.new_body


def check_leadspc(result: ConnectionResult) -> None:
    assert result.messages[0].header("X-Values") == (
        "' caf\u00e9 \u00fcber' ' \\udce9t\\udce9' ' a\\n\\tb\\n c'"
    )


def quit_nc_script(conn: MilterConnection) -> list[object]:
    out: list[object] = [conn.negotiate()]
    for host in ("first.example", "second.example"):
        out.append(conn.connect(host, InetAddress(IPv4Address("192.0.2.7"), 25)))
        out.append(conn.mail("<a@example.net>"))
        out.append(conn.rcpt("<b@example.org>"))
        out.append(conn.eom())
        conn.quit_new_connection()
    conn.quit()
    return out


def abort_mid_message_script(conn: MilterConnection) -> list[object]:
    out: list[object] = [conn.negotiate()]
    out.append(conn.connect("h", None))
    out.append(conn.mail("<a@example.net>"))
    out.append(conn.rcpt("<b@example.org>"))
    conn.abort()  # RSET in the middle of a message
    out.append(conn.mail("<a@example.net>"))
    out.append(conn.rcpt("<b@example.org>"))
    out.append(conn.eom())
    conn.quit()
    return out


def check_script_quit_nc(result: object) -> None:
    assert isinstance(result, list)
    first, second = result[4], result[8]
    assert isinstance(first, Answer) and isinstance(second, Answer)
    assert [m for m in first.modifications] == [HeaderAdded("X-Host", "first.example"),
                                                 HeaderAdded("X-Has-Old-State", "False")]
    # A new session object after QUIT_NC.
    assert second.modifications[1] == HeaderAdded("X-Has-Old-State", "False")


SCENARIOS: list[Scenario] = [
    Scenario("every-action", f.EveryAction, check=check_every_action),
    *verdict_scenarios(),
    *reply_scenarios(),
    Scenario("noreply", f.NoReplyStages, messages=((two_rcpts(), MESSAGE),), check=check_noreply),
    Scenario("noreply-not-offered", f.NoReplyStages,
             protocol=ALL_PROTOCOL & ~ProtocolOpts(0xFF080)),
    Scenario("skip-body", f.SkipBody, messages=((Envelope(), BIG),), check=check_skip_body),
    Scenario("skip-headers", f.SkipHeaders, check=check_skip_headers),
    Scenario(
        "aborts-two-messages",
        f.AbortCounter,
        messages=(
            (Envelope.of("bad@example.net"), MESSAGE),
            (Envelope.of("good@example.net"), MESSAGE),
            (Envelope.of("good@example.net"), MESSAGE),
            (Envelope.of("good@example.net"), BIG),
        ),
        check=check_aborts,
    ),
    Scenario("eom-and-abort-only", f.EomAndAbortOnly,
             messages=((Envelope(), MESSAGE), (Envelope(), MESSAGE))),
    Scenario(
        "errors",
        f.FaultyBySender,
        messages=tuple(
            (Envelope.of(f"{what}@example.net"), MESSAGE)
            for what in ("raise-mail", "garbage", "undeclared", "raise-eom", "fine")
        ),
        check=check_faulty,
    ),
    Scenario("unknown", f.Unknown, client=ClientInfo(unknown=("FOO bar", "XSPAM")),
             check=check_unknown),
    Scenario("requested-macros", f.Macros, check=check_macros),
    Scenario("default-macros", f.DefaultMacros),
    Scenario(
        "raw-8bit-ipv4",
        f.Raw,
        messages=((Envelope.of("<s\u00e9nder@example.net>", [Recipient("r@example.org",
                                                                    "NOTIFY=NEVER ORCPT=x")],
                               sender_params="BODY=8BITMIME SMTPUTF8"), EIGHT_BIT),),
        check=check_raw,
    ),
    Scenario("raw-ipv6", f.Raw, client=ClientInfo(
        hostname="v6.example", address=InetAddress(IPv6Address("2001:db8::25"), 2525))),
    Scenario("raw-unix", f.Raw, client=ClientInfo(address=UnixAddress("/run/client.sock"))),
    Scenario("raw-unknown-family", f.Raw, client=ClientInfo(hostname="unknown",
                                                            address=None, helo="x")),
    Scenario("leading-space", f.LeadingSpace, messages=((Envelope(), EIGHT_BIT),),
             check=check_leadspc),
    Scenario("quit-new-connection", f.ConnectState, script=quit_nc_script),
    Scenario("abort-mid-message", f.AbortCounter, script=abort_mid_message_script),
    *shape_scenarios(),
]


@pytest.fixture(scope="module")
def milters() -> Iterator[dict[str, MilterProcess]]:
    """One real milter process per filter class, started on first use."""
    started: dict[str, MilterProcess] = {}
    try:
        yield started
    finally:
        for process in started.values():
            process.__exit__(None, None, None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _client(milters: dict[str, MilterProcess], scenario: Scenario) -> MilterClient:
    name = scenario.filter.__name__
    key = f"{name}-tcp" if scenario.tcp else name
    if key not in milters:
        spec = f"inet:{_free_port()}@127.0.0.1" if scenario.tcp else None
        milters[key] = MilterProcess(f"{MODULE}:{name}", spec).__enter__()
    return MilterClient(milters[key].socket, timeout=10, protocol=scenario.protocol,
                        client=scenario.client)


def _run(driver: Harness | MilterClient, scenario: Scenario) -> object:
    if scenario.script is not None:
        return scenario.script(driver.open())
    return driver.run_connection(scenario.messages)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_harness_equals_real_runner(scenario: Scenario, milters: dict[str, MilterProcess]) -> None:
    harness = Harness(scenario.filter, protocol=scenario.protocol, client=scenario.client,
                      tcp=scenario.tcp)
    expected = _run(harness, scenario)
    client = _client(milters, scenario)
    try:
        actual = _run(client, scenario)
    except Exception:
        print(milters[f"{scenario.filter.__name__}{'-tcp' * scenario.tcp}"].log()[-3000:])
        raise
    assert actual == expected
    if scenario.check is not None:
        assert isinstance(expected, ConnectionResult)
        scenario.check(expected)
    if scenario.script is quit_nc_script:
        check_script_quit_nc(expected)


def test_scenarios_cover_every_verdict_at_every_stage() -> None:
    names = {s.name for s in SCENARIOS}
    for verdict in ("reject", "tempfail", "discard", "accept"):
        for stage in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom"):
            assert f"{verdict}-at-{stage}" in names


