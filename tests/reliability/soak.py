"""Soak test: a long, seeded, randomised mix of conversations against two running milters.

    python -m tests.reliability.soak --messages 1000000 --connections 16 --seed 1

starts the recipient counter (`examples.rcpt_count:RcptCount`) and `SoakEveryAction`
(tests/reliability/filters.py) with `pymilterkit run`, each in its own process, and drives them
from `--connections` threads, each keeping one milter connection busy at a time. Every
connection picks a milter and a plan at random (from `--seed`, so a run can be repeated):

* one to five messages per connection (MAIL, RCPT..., DATA, headers, EOH, body, EOM);
* clean messages; messages aborted mid-way (then the connection goes on); the client hanging
  up after any stage, after sending EOM without reading the answer, or in the middle of a
  packet; exceptions raised at every stage, chosen by recipient/sender/host names; rejected
  recipients with a custom multi-line reply; huge headers (60 kB values, hundreds of
  headers); and `--big-bodies` messages with a 10 MB body.

Every answer and every modification is compared with the one the filters must give; the
milters' PIDs are watched throughout; at the end each milter gets SIGTERM, must exit 0 and log
"0 left open" and no unexpected traceback. Resident memory (VmRSS) of each milter is read at
start, after the warm-up (the first 10% of messages, at least 1000) and at the end; growth from
warm-up to end above `--rss-bound-mb` (default 16 MiB) fails the run.

Exit status 0 when everything was right, 1 otherwise. Prints a report either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pymilterkit import MilterError, Status  # noqa: E402
from pymilterkit.testing import (  # noqa: E402
    Answer,
    BodyReplaced,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    MilterClient,
    MilterConnection,
    MilterProcess,
    Modification,
    Progress,
    Quarantined,
    RecipientAdded,
    RecipientRemoved,
    Reply,
    SenderChanged,
    Step,
)
from pymilterkit.testing import _wire as w  # noqa: E402
from tests.helpers import local_part  # noqa: E402
from tests.reliability.filters import (  # noqa: E402
    ADDED,
    NEW_SENDER,
    QUARANTINE_REASON,
    REJECT_REPLY,
)

COUNTER = "examples.rcpt_count:RcptCount"
EVERY_ACTION = "tests.reliability.filters:SoakEveryAction"
BIG_BODY_SIZE = 10 * 1024 * 1024
CHUNK = 65535
MESSAGE_STAGES = ("data", "header", "eoh", "body", "eom")
HANGUP_POINTS = (
    "negotiate", "connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body",
    "eom-unread", "mid-packet",
)
ABORT_POINTS = ("mail", "rcpt", "data", "header", "eoh", "body")


@dataclasses.dataclass
class Config:
    messages: int = 20_000
    connections: int = 16
    seed: int = 1
    big_bodies: int = 3
    rss_bound_mb: float = 16.0
    timeout: float = 60.0
    quiet: bool = False


@dataclasses.dataclass
class MilterReport:
    target: str
    pid: int
    rss_start_kb: int = 0
    rss_warm_kb: int = 0
    rss_end_kb: int = 0
    exit_status: int | None = None
    log_ok: bool = False
    log_problem: str = ""


@dataclasses.dataclass
class Report:
    config: Config
    messages: int = 0
    connections: int = 0
    wrong: int = 0
    crashes: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    kinds: Counter[str] = dataclasses.field(default_factory=Counter)
    milters: list[MilterReport] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def rss_ok(self) -> bool:
        bound = self.config.rss_bound_mb * 1024
        return all(m.rss_end_kb - m.rss_warm_kb <= bound for m in self.milters)

    @property
    def ok(self) -> bool:
        return (
            self.wrong == 0
            and self.crashes == 0
            and not self.errors
            and self.rss_ok
            and all(m.exit_status == 0 and m.log_ok for m in self.milters)
        )

    def text(self) -> str:
        lines = [
            f"soak: {self.messages} messages on {self.connections} connections in "
            f"{self.seconds:.1f} s ({self.messages / max(self.seconds, 1e-9):.0f} msg/s), "
            f"seed {self.config.seed}, {self.config.connections} concurrent",
            f"wrong answers: {self.wrong}   crashes: {self.crashes}   "
            f"driver errors: {len(self.errors)}",
            "mix: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items())),
        ]
        for m in self.milters:
            lines.append(
                f"{m.target} (pid {m.pid}): RSS start {m.rss_start_kb / 1024:.1f} MiB, "
                f"after warm-up {m.rss_warm_kb / 1024:.1f} MiB, end {m.rss_end_kb / 1024:.1f} "
                f"MiB (growth {(m.rss_end_kb - m.rss_warm_kb) / 1024:+.1f} MiB, bound "
                f"{self.config.rss_bound_mb:g}); exit {m.exit_status}; "
                f"log {'ok' if m.log_ok else 'BAD: ' + m.log_problem}"
            )
        lines.extend(f"  {e}" for e in self.errors[:20])
        lines.append("RESULT: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Mismatch(Exception):
    """An answer differed from the expected one."""


# -- messages ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Message:
    sender: str
    recipients: list[str]
    headers: list[tuple[str, str]]
    body: bytes
    abort_at: str | None = None
    hangup_at: str | None = None


_BIG_BODY: bytes | None = None
_BIG_LOCK = threading.Lock()


def big_body() -> bytes:
    global _BIG_BODY
    with _BIG_LOCK:
        if _BIG_BODY is None:
            rng = random.Random(0)
            line = bytes(rng.randrange(32, 127) for _ in range(998)) + b"\r\n"
            _BIG_BODY = (line * (BIG_BODY_SIZE // len(line) + 1))[:BIG_BODY_SIZE]
        return _BIG_BODY


def make_message(rng: random.Random, every_action: bool, big: bool) -> Message:
    kind = rng.random()
    recipients = [f"<r{n}-{rng.randrange(10**6)}@example.com>" for n in range(rng.randint(1, 5))]
    sender = f"<s{rng.randrange(10**6)}@example.net>"
    headers = [("Subject", f"soak {rng.randrange(10**9)}")]
    for n in range(rng.randint(0, 6)):
        value = " ".join(f"w{rng.randrange(10**6)}" for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.2:
            value += "\n\tfolded " + str(rng.randrange(1000))
        headers.append((f"X-Soak-{n}", value))
    if rng.random() < 0.3:
        headers.insert(rng.randrange(len(headers) + 1), ("X-Remove-Me", "yes"))
    if rng.random() < 0.03:  # huge: a 60 kB folded value, or hundreds of headers
        if rng.random() < 0.5:
            piece = "x" * 70
            headers.append(("X-Huge", "\n\t".join([piece] * 800)[:60_000]))
        else:
            headers.extend((f"X-Many-{n}", f"v{n}") for n in range(400))
    if rng.random() < 0.05:
        headers.append(("X-8bit", "caf\xe9 \u2603 \udcff"))
    body = bytes(rng.randrange(256) for _ in range(rng.choice((0, 10, 200, 3000))))
    if rng.random() < 0.02:
        body = rng.randbytes(rng.randint(CHUNK - 5, 3 * CHUNK))
    if big:
        body = big_body()
    message = Message(sender, recipients, headers, body)
    if not every_action:
        kind = kind * 0.3 + 0.7 if kind < 0.55 else kind  # no faults on the counter
    if every_action and kind < 0.12:
        stage = rng.choice(("mail", "rcpt", *MESSAGE_STAGES, "abort"))
        if stage == "mail":
            message.sender = "<fault-mail@example.net>"
        else:
            message.recipients.insert(rng.randrange(len(recipients) + 1),
                                      f"<fault-{stage}@example.com>")
        if stage == "abort":
            message.abort_at = rng.choice(ABORT_POINTS[1:])
        if stage == "body" and not message.body:
            message.body = b"x\r\n"
    elif every_action and kind < 0.2:
        message.recipients.insert(rng.randrange(len(recipients) + 1), "<reject@example.com>")
        if rng.random() < 0.1:
            message.recipients = ["<reject@example.com>"]
    elif kind < 0.8:
        pass  # clean
    elif kind < 0.9:
        message.abort_at = rng.choice(ABORT_POINTS)
    else:
        message.hangup_at = rng.choice(HANGUP_POINTS[3:])
    return message


def header_digest(headers: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, value in headers:
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(value.encode("utf-8", "surrogateescape") + b"\0")
    return f"{len(headers)}:{digest.hexdigest()[:16]}"


def expected_eom(message: Message, accepted: list[str], every_action: bool) -> tuple[
        Modification, ...]:
    if not every_action:
        return (HeaderAdded("X-Rcpt-Count", str(len(message.recipients))),)
    body = hashlib.sha256(message.body).hexdigest()[:16]
    mods: list[Modification] = [
        HeaderAdded("X-Rcpt-Count", str(len(accepted))),
        HeaderAdded("X-Header-Digest", header_digest(message.headers)),
        HeaderAdded("X-Body-Digest", f"{len(message.body)}:{body}"),
        HeaderInserted(0, "X-Inserted", "first"),
        HeaderChanged("Subject", 1, "changed by the soak filter"),
        HeaderDeleted("X-Remove-Me", 1),
        SenderChanged(*NEW_SENDER),
        RecipientAdded(ADDED[0], None),
        RecipientAdded(ADDED[1], ADDED[2]),
    ]
    if accepted:
        mods.append(RecipientRemoved(accepted[0]))
    mods += [
        BodyReplaced(f"soak body {len(message.body)}\r\n".encode()),
        Progress(),
        Quarantined(QUARANTINE_REASON),
    ]
    return tuple(mods)


REJECT = Reply(REJECT_REPLY[0], REJECT_REPLY[1], REJECT_REPLY[2:], True)


def expect(answer: Answer | None, status: Status, what: str, reply: Reply | None = None,
           mods: tuple[Modification, ...] = ()) -> None:
    if answer is None:
        raise Mismatch(f"{what}: nothing was sent (stage negotiated away?)")
    if answer.status is not status or answer.reply != reply or answer.modifications != mods:
        raise Mismatch(
            f"{what}: got {answer.status.name} {answer.reply} {answer.modifications!r}; "
            f"expected {status.name} {reply} {mods!r}"
        )


# -- one conversation --------------------------------------------------------------------------


class Hangup(Exception):
    """The plan says: hang up here."""


def fault_stage(message: Message) -> str | None:
    for rcpt in message.recipients:
        local = local_part(rcpt)
        if local.startswith("fault-") and local[6:] in MESSAGE_STAGES:
            return local[6:]
    return None


def run_message(conn: MilterConnection, message: Message, every_action: bool,
                report_kind: Counter[str]) -> None:
    """Send one message, checking each answer; raises Hangup when the plan hangs up."""
    def point(name: str) -> None:
        if message.hangup_at == name:
            raise Hangup(name)
        if message.abort_at == name:
            conn.abort()
            raise _Aborted

    fault = fault_stage(message) if every_action else None
    try:
        answer = conn.mail(message.sender)
        if every_action and message.sender.startswith("<fault-mail"):
            expect(answer, Status.TEMPFAIL, "mail (fault)")
            report_kind["fault-mail"] += 1
            conn.abort()
            return
        expect(answer, Status.CONTINUE, "mail")
        point("mail")
        accepted: list[str] = []
        for rcpt in message.recipients:
            answer = conn.rcpt(rcpt)
            local = local_part(rcpt)
            if every_action and local == "fault-rcpt":
                expect(answer, Status.TEMPFAIL, f"rcpt {rcpt} (fault)")
                report_kind["fault-rcpt"] += 1
            elif every_action and local == "reject":
                expect(answer, Status.REJECT, f"rcpt {rcpt}", REJECT)
                report_kind["rejected-rcpt"] += 1
            else:
                expect(answer, Status.CONTINUE, f"rcpt {rcpt}")
                accepted.append(rcpt)
            point("rcpt")
        if not accepted:
            conn.abort()  # every recipient refused: the MTA ends the transaction
            return

        def stage(name: str, answer: Answer | None) -> bool:
            """True if the message ended here (injected fault)."""
            if fault == name:
                expect(answer, Status.TEMPFAIL, f"{name} (fault)")
                report_kind[f"fault-{name}"] += 1
                conn.abort()
                return True
            expect(answer, Status.CONTINUE, name)
            return False

        if every_action and stage("data", conn.data()):
            return
        if not every_action and conn.data() is not None:
            raise Mismatch("data was sent to the counter, which negotiated it away")
        point("data")
        for number, (name, value) in enumerate(message.headers):
            answer = conn.header(name, value)
            if every_action:
                if stage("header", answer):
                    return
            elif answer is not None:
                raise Mismatch("a header was sent to the counter")
            if number == len(message.headers) // 2:
                point("header")
        answer = conn.eoh()
        if every_action and stage("eoh", answer):
            return
        point("eoh")
        for number, start in enumerate(range(0, len(message.body), CHUNK)):
            answer = conn.body(message.body[start : start + CHUNK])
            if every_action and stage("body", answer):
                return
            if number == 0:
                point("body")
        if message.hangup_at == "eom-unread":
            conn.endpoint.send(w.BODYEOB, b"", Step.EOM)
            raise Hangup("eom-unread")
        if message.hangup_at == "mid-packet":
            sock = conn.endpoint.sock  # type: ignore[attr-defined]
            sock.sendall(w.encode_packet(w.BODYEOB)[:3])
            raise Hangup("mid-packet")
        answer = conn.eom()
        if fault == "eom":
            expect(answer, Status.TEMPFAIL, "eom (fault)")
            report_kind["fault-eom"] += 1
        else:
            expect(answer, Status.CONTINUE, "eom", None,
                   expected_eom(message, accepted, every_action))
            report_kind["delivered"] += 1
        conn.abort()  # Postfix sends abort after every transaction
    except _Aborted:
        report_kind[f"aborted-after-{message.abort_at}"] += 1


class _Aborted(Exception):
    pass


class Driver:
    def __init__(self, config: Config, sockets: dict[str, str]) -> None:
        self.config = config
        self.sockets = sockets
        self.report = Report(config)
        self.lock = threading.Lock()
        self.started = 0
        self.bigs_left = config.big_bodies
        self.warm_at = max(1000, config.messages // 10)
        self.warm_event = threading.Event()
        self.stop = threading.Event()

    def claim(self, count: int) -> int:
        with self.lock:
            count = min(count, self.config.messages - self.started)
            self.started += count
            if self.started >= self.warm_at:
                self.warm_event.set()
            return count

    def take_big(self, rng: random.Random) -> bool:
        with self.lock:
            # Spread the big bodies over the run: one early, the rest at random later.
            if self.bigs_left <= 0:
                return False
            share = self.config.big_bodies / max(self.config.messages, 1)
            first = self.started < 50 and self.bigs_left == self.config.big_bodies
            if first or rng.random() < share:
                self.bigs_left -= 1
                return True
            return False

    def wrong(self, text: str) -> None:
        with self.lock:
            self.report.wrong += 1
            if len(self.report.errors) < 50:
                self.report.errors.append(text)

    def worker(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        clients = {t: MilterClient(s, timeout=self.config.timeout) for t, s in self.sockets.items()}
        kinds: Counter[str] = Counter()
        connections = 0
        while not self.stop.is_set():
            count = self.claim(rng.randint(1, 5))
            if count == 0:
                break
            target = COUNTER if rng.random() < 0.3 else EVERY_ACTION
            every = target == EVERY_ACTION
            messages = [make_message(rng, every, self.take_big(rng)) for _ in range(count)]
            connections += 1
            kinds[f"conn-{'every' if every else 'counter'}"] += 1
            sent = [0]
            try:
                self.conversation(clients[target], messages, every, rng, kinds, sent)
            except Mismatch as exc:
                self.wrong(f"worker {index} {target}: {exc}")
            except MilterError as exc:
                self.wrong(f"worker {index} {target}: {type(exc).__name__}: {exc}")
            except Exception as exc:  # noqa: BLE001 - a driver bug: report, keep going
                with self.lock:
                    self.report.errors.append(f"worker {index}: {type(exc).__name__}: {exc}")
            finally:
                # Messages a connection never got to (it hung up or was refused) go back.
                with self.lock:
                    self.started -= count - sent[0]
        with self.lock:
            self.report.kinds.update(kinds)
            self.report.connections += connections

    def conversation(self, client: MilterClient, messages: list[Message], every: bool,
                     rng: random.Random, kinds: Counter[str], sent: list[int]) -> None:
        conn = client.open()
        try:
            conn_fault = rng.random() < 0.04 if every else False
            host = rng.choice(("fault-connect", "fault-helo", "fault-close")) if conn_fault \
                else "client.example.net"
            hang = rng.random() < 0.03
            if hang and rng.random() < 0.3:
                conn.close()  # before negotiation
                kinds["hangup-before-negotiate"] += 1
                return
            conn.negotiate()
            if hang and rng.random() < 0.3:
                kinds["hangup-after-negotiate"] += 1
                return
            answer = conn.connect(host, None)
            helo = "fault-helo" if host == "fault-helo" else "helo.example.net"
            if every:
                if host == "fault-connect":
                    expect(answer, Status.TEMPFAIL, "connect (fault)")
                    kinds["fault-connect"] += 1
                    return
                expect(answer, Status.CONTINUE, "connect")
                if hang and rng.random() < 0.5:
                    kinds["hangup-after-connect"] += 1
                    return
                answer = conn.helo(helo)
                if helo == "fault-helo":
                    expect(answer, Status.TEMPFAIL, "helo (fault)")
                    kinds["fault-helo"] += 1
                    return
                expect(answer, Status.CONTINUE, "helo")
                if host == "fault-close":
                    kinds["fault-close"] += 1
            else:
                conn.helo(helo)
            for message in messages:
                sent[0] += 1
                with self.lock:
                    self.report.messages += 1
                if len(message.body) >= BIG_BODY_SIZE:
                    kinds["10MB-body"] += 1
                if any(n in ("X-Huge", "X-Many-0") for n, _ in message.headers):
                    kinds["huge-headers"] += 1
                try:
                    run_message(conn, message, every, kinds)
                except Hangup as exc:
                    kinds[f"hangup-{exc}"] += 1
                    return
            conn.quit()
            kinds["quit"] += 1
        finally:
            conn.close()


def _check_log(milter: MilterProcess, report: MilterReport) -> None:
    text = milter.log()
    stopped = [line for line in text.splitlines() if "stopped:" in line]
    problems = []
    if not stopped or " 0 left open" not in stopped[-1]:
        problems.append(f"stop line: {stopped[-1:] or 'missing'}")
    # Injected faults are logged (with their traceback) on purpose; anything else is not.
    unexpected = [
        line for line in text.splitlines()
        if ("Error" in line or "Exception" in line or "Traceback" in line)
        # A filter's action after the client hung up is refused by libmilter: expected.
        and "InjectedFault" not in line and "LibmilterError" not in line
        and not line.startswith(("  ", "Traceback", "The above exception"))
    ]
    if "Exception ignored" in text or "Fatal Python error" in text:
        problems.append("interpreter-level error in the log")
    if unexpected:
        problems.append(f"unexpected log lines: {unexpected[:3]}")
    report.log_ok = not problems
    report.log_problem = "; ".join(problems)


def run_soak(config: Config) -> Report:
    targets = (COUNTER, EVERY_ACTION)
    milters = [MilterProcess(t, args=["--log-level", "INFO"], cwd=ROOT) for t in targets]
    for milter in milters:
        milter.start()
    try:
        return _drive(config, milters)
    finally:
        for milter in milters:
            milter.stop()
            milter.__exit__(None, None, None)


def _drive(config: Config, milters: list[MilterProcess]) -> Report:
    sockets = {m.target: m.socket for m in milters}
    driver = Driver(config, sockets)
    report = driver.report
    report.milters = [MilterReport(m.target, m.pid, rss_kb(m.pid)) for m in milters]
    began = time.monotonic()
    threads = [threading.Thread(target=driver.worker, args=(i,), daemon=True)
               for i in range(config.connections)]
    for thread in threads:
        thread.start()
    warm_read = False
    last_print = began
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        for milter in milters:
            if milter.process is not None and milter.process.poll() is not None:
                report.crashes += 1
                report.errors.append(f"{milter.target} died with {milter.process.returncode}")
                driver.stop.set()
        if driver.stop.is_set():
            break
        if not warm_read and driver.warm_event.is_set():
            warm_read = True
            for mr in report.milters:
                mr.rss_warm_kb = rss_kb(mr.pid)
        if not config.quiet and time.monotonic() - last_print > 30:
            last_print = time.monotonic()
            rss = ", ".join(f"{rss_kb(m.pid) / 1024:.1f}" for m in report.milters)
            print(f"  ... {driver.started} messages started, {report.wrong} wrong, "
                  f"RSS MiB {rss}", flush=True)
    for thread in threads:
        thread.join(config.timeout * 2)
    report.seconds = time.monotonic() - began
    time.sleep(0.5)  # connections that just hung up are being closed by libmilter
    for milter, mr in zip(milters, report.milters, strict=True):
        if milter.process is not None and milter.process.poll() is None:
            mr.rss_end_kb = rss_kb(mr.pid)
            if not warm_read:
                mr.rss_warm_kb = mr.rss_end_kb
        milter.signal(signal.SIGTERM)
    for milter, mr in zip(milters, report.milters, strict=True):
        try:
            mr.exit_status = milter.wait(30)
        except Exception as exc:  # noqa: BLE001 - reported
            report.errors.append(f"{milter.target} did not stop: {exc}")
        _check_log(milter, mr)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=Config.messages)
    parser.add_argument("--connections", type=int, default=Config.connections)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--big-bodies", type=int, default=Config.big_bodies,
                        help="messages with a 10 MB body (default 3)")
    parser.add_argument("--rss-bound-mb", type=float, default=Config.rss_bound_mb,
                        help="allowed RSS growth from warm-up to end, MiB (default 16)")
    parser.add_argument("--timeout", type=float, default=Config.timeout)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = Config(args.messages, args.connections, args.seed, args.big_bodies,
                    args.rss_bound_mb, args.timeout, args.quiet)
    report = run_soak(config)
    print(report.text(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
