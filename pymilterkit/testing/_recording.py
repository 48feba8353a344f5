"""Recordings (`--record`) read back: harness input, replay, and the `replay` command.

`Recording.load(path)` reads one `*.milterlog` file (a `.part` one too: the whole messages it
holds), checking each line: the connection as `ClientInfo` plus `(Envelope, bytes)` messages
that `Harness` and `MilterClient` accept, and what the filter answered (`recorded`), one
`Outcome` per message (`_split` tells them apart). `Recording.replay(driver)`
plays the recorded commands again, in their order and with their macros, on a new connection
of `driver`, and returns the new answers in the same shape, so the two compare with `==`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from .._errors import ConfigurationError, MilterError
from .._flags import ProtocolOpts, Status
from .._protocol import ENDS_MESSAGE, REPLY_CLASS
from .._record import FORMAT, PARTIAL, SUFFIX, VERSION
from .._types import InetAddress, UnixAddress
from .._validate import MAX_DATA
from ._conversation import MilterConnection
from ._driver import MtaDriver
from ._engine import reply_text
from ._envelope import ClientInfo, Envelope, Recipient, bracket
from ._results import (
    Answer,
    BodyReplaced,
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    Modification,
    Progress,
    Quarantined,
    RecipientAdded,
    RecipientRemoved,
    Reply,
    SenderChanged,
    Step,
)

__all__ = ["Outcome", "Recording", "cmd_replay"]

_CONNECTION = ("connect", "helo", "unknown")
_MODIFICATION: dict[str, Any] = {
    "add_header": HeaderAdded,
    "insert_header": HeaderInserted,
    # an empty value deletes, as the wire client reads it (and as Postfix and Sendmail do)
    "change_header": lambda name, index, value: HeaderChanged(name, max(index, 1), value)
    if value else HeaderDeleted(name, max(index, 1)),
    "delete_header": lambda name, index: HeaderDeleted(name, max(index, 1)),
    "change_sender": SenderChanged,
    "add_recipient": RecipientAdded,
    "add_recipient_par": RecipientAdded,
    "remove_recipient": RecipientRemoved,
    "replace_body": lambda body: BodyReplaced(body.encode("utf-8", "surrogateescape")),
    "quarantine": Quarantined,
}


def _show(mod: Modification) -> str:
    if isinstance(mod, BodyReplaced):
        digest = hashlib.sha256(mod.body).hexdigest()[:12]
        return f"BodyReplaced({len(mod.body)} bytes, sha256 {digest})"
    fields = ", ".join(f"{v!r}" for v in dataclasses.astuple(mod) if v is not None)
    return f"{type(mod).__name__}({fields})"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a filter decided about one message (or a connection refused before any): the
    verdict, where, its reply, each recipient's refusal, the modifications, and each HELO or
    unknown command it refused without ending the connection, as text."""

    status: Status
    stage: str
    reply: str | None = None
    recipients: tuple[str, ...] = ()
    modifications: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """One line per fact, the verdict first."""
        verdict = f"{self.status.name} at {self.stage}" + (f" {self.reply}" if self.reply else "")
        return [verdict, *self.commands, *self.recipients, *self.modifications]


def _refused(step: str, detail: str, answer: Answer) -> str:
    """A refusal that ends nothing (a recipient's, a command's) as a line of an `Outcome`."""
    text = _reply(answer)
    return f"{step} {detail}: {answer.status.name}" + (f" {text}" if text else "")


def _reply(answer: Answer) -> str | None:
    return None if answer.reply is None else str(answer.reply).replace("\r\n", " / ")


def _outcome(answers: Sequence[tuple[str, str, Answer]],
             commands: Sequence[str] = ()) -> Outcome:
    """The outcome of one message's answers (step, detail, answer), in order, and the
    connection's refused commands that came with it."""
    status, stage, reply = Status.CONTINUE, "", None
    rcpts: list[str] = []
    mods: list[str] = []
    for step, detail, answer in answers:
        stage = step
        if step == "rcpt" and answer.status in (Status.REJECT, Status.TEMPFAIL, Status.DISCARD):
            rcpts.append(_refused(step, detail, answer))
        mods.extend(_show(m) for m in _merged(answer.modifications))
        if step != "rcpt" and answer.status in ENDS_MESSAGE:
            status, reply = answer.status, _reply(answer)
            break
    return Outcome(status, stage, reply, tuple(rcpts), tuple(mods), tuple(commands))


def _merged(mods: Iterable[Modification]) -> list[Modification]:
    out: list[Modification] = []
    for mod in mods:
        if isinstance(mod, Progress):
            continue
        if isinstance(mod, BodyReplaced) and out and isinstance(out[-1], BodyReplaced):
            out[-1] = BodyReplaced(out[-1].body + mod.body)
        else:
            out.append(mod)
    return out


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _address(value: Any) -> InetAddress | UnixAddress | None:
    if not value:
        return None
    if value[0] == "unix":
        return UnixAddress(value[1])
    return InetAddress(ip_address(value[1]), int(value[2]))


def _recorded_answers(entries: Sequence[dict[str, Any]]) -> list[Answer | None]:
    """Each recorded stage's answer as the wire client would have read it (None: none noted).
    A `set_reply` text waits, as in libmilter, for a REJECT or TEMPFAIL of its class, in that
    stage or a later one (of a later message too); a later `set_reply` replaces it."""
    answers: list[Answer | None] = []
    pending: bytes | None = None
    for entry in entries:
        mods = []
        for name, *args in entry.get("actions", ()):
            if name == "set_reply":
                code, xcode, lines = args
                pending = reply_text(_raw(code), None if xcode is None else _raw(xcode),
                                     [_raw(line) for line in lines])
            elif name in _MODIFICATION:
                mods.append(_MODIFICATION[name](*args))
        if "answer" not in entry:
            answers.append(None)
            continue
        status, reply = Status[entry["answer"]], None
        if pending is not None and pending[:1] == REPLY_CLASS.get(status):
            reply, pending = Reply.parse(pending), None
        answers.append(Answer(Step(entry["stage"]), status, reply, tuple(mods)))
    return answers


@dataclasses.dataclass(frozen=True)
class Recording:
    """One recorded connection (`Recording.load`): harness input and the recorded outcomes."""

    path: Path
    head: dict[str, Any]
    """The file's first line: format, version, filter, pid, time, body, protocol."""
    entries: tuple[dict[str, Any], ...]
    """The recorded stages, in order."""
    client: ClientInfo
    messages: tuple[tuple[Envelope, bytes], ...]
    """Each message's envelope (with its recorded macros) and its bytes, for
    `Harness.run_connection`/`MilterClient.run_connection` (with `client=`)."""
    recorded: tuple[Outcome, ...]
    """What the recorded filter decided, per message (one for a connection refused before
    its first message)."""
    complete: bool
    """False for a connection cut short (a `.part` file: a worker killed, a stop)."""

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        """Read one recording file; raises `ConfigurationError` for what is not one, naming
        the malformed line."""
        path = Path(path)
        try:
            rows = path.read_text("utf-8", "surrogateescape").split("\n")
        except OSError as exc:
            raise ConfigurationError(f"cannot read recording {path}: {exc}") from None
        torn = rows.pop() != ""  # a last line without its end was cut short
        lines = [_line(path, number, row) for number, row in enumerate(rows, 1)]
        if not lines or lines[0].get("format") != FORMAT or lines[0].get("version") != VERSION:
            raise ConfigurationError(f"{path} is not a {FORMAT} version {VERSION} file")
        if not isinstance(lines[0].get("protocol", 0), int):
            raise ConfigurationError(f"{path} line 1: protocol is not a number")
        entries = tuple(line for line in lines[1:] if "stage" in line)
        complete = lines[-1].get("end") is not None
        if torn and not complete:
            entries = _whole(entries)
        return cls(path, lines[0], entries, *_inputs(lines[0], entries),
                   _outcomes(entries, _recorded_answers(entries)), complete)

    def replay(self, driver: MtaDriver) -> tuple[Outcome, ...]:
        """Play the recorded commands, in order and with their macros, on a new connection of
        `driver` (a `Harness` or a `MilterClient`); the new outcomes, per message."""
        conn = driver.open()
        conn.negotiate()
        answers: dict[int, Answer | None] = {}
        try:
            _play(conn, self.entries, answers)
        finally:
            conn.close()
        return _outcomes(self.entries, [answers.get(i) for i in range(len(self.entries))])


_ORDER = {s: n for n, s in enumerate(("mail", "rcpt", "data", "header", "eoh", "body", "eom"))}
"""The stages of a message, in the order an MTA sends them."""
_ENDING = frozenset(status.name for status in ENDS_MESSAGE)


def _split(entries: Sequence[dict[str, Any]]) -> tuple[list[int], int]:
    """Which message each entry belongs to, and how many messages there are. A message
    begins at MAIL, or (for a filter without `on_mail`, which never sees one) at a message
    stage after a message that ended, or one that comes before the last stage seen (a new
    message's RCPT after a header). A connection-level command (connect, HELO, unknown)
    belongs to the message under way, else to the next one (`count` if none follows)."""
    owner: list[int] = []
    count, last = 0, -1  # last: the stage order reached by the message under way (-1: none)
    for entry in entries:
        stage = entry["stage"]
        order = _ORDER.get(stage)
        if order is None:
            if stage != "unknown":  # a connect or a HELO ends a message under way
                last = -1
            owner.append(count - 1 if last >= 0 else count)
            continue
        if last < 0 or order < last or (order == last and stage not in ("rcpt", "header",
                                                                          "body")):
            count += 1
        owner.append(count - 1)
        ended = stage == "eom" or (stage != "rcpt" and entry.get("answer") in _ENDING)
        last = -1 if ended else order
    return owner, count


_ARGS = {"connect": ("text", "address"), "helo": ("text",), "unknown": ("text",),
         "mail": ("text", "text"), "rcpt": ("text", "text"), "data": (),
         "header": ("text", "text"), "eoh": (), "body": ("chunk?",), "eom": ()}
"""Each stage's arguments, by kind (`_fits`)."""
_ACTIONS = {"set_reply": ("text", "text?", "lines"), "add_header": ("text", "text"),
            "insert_header": ("int", "text", "text"), "change_header": ("text", "int", "text"),
            "delete_header": ("text", "int"), "change_sender": ("text", "text?"),
            "add_recipient": ("text",), "add_recipient_par": ("text", "text"),
            "remove_recipient": ("text",), "replace_body": ("chunk",), "quarantine": ("text",),
            "progress": ()}
"""Each action's arguments, by kind."""


def _line(path: Path, number: int, row: str) -> dict[str, Any]:
    """Line `number` of a recording, checked: a malformed one raises `ConfigurationError`
    naming it (what reads the entries after trusts their shape)."""
    try:
        line = json.loads(row)
    except ValueError as exc:
        raise ConfigurationError(f"{path} line {number}: not JSON ({exc})") from None
    if not isinstance(line, dict):
        raise ConfigurationError(f"{path} line {number}: not a JSON object")
    problem = None if number == 1 or "stage" not in line else _problem(line)
    if problem is not None:
        raise ConfigurationError(f"{path} line {number}: {problem}")
    return line


def _problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with a recorded stage line (None: nothing)."""
    stage, args = entry["stage"], entry.get("args")
    kinds = _ARGS.get(stage) if isinstance(stage, str) else None
    if kinds is None:
        return f"unknown stage {stage!r}"
    if not _fits(args, kinds):
        return f"{stage}: arguments {args!r} are not {', '.join(kinds) or 'none'}"
    macros = entry.get("macros")
    if macros is not None and not (isinstance(macros, dict) and all(
            _fits([k, v], ("text", "text?")) for k, v in macros.items())):
        return f"{stage}: macros are not names and texts: {macros!r}"
    if "answer" in entry and not (isinstance(entry["answer"], str)
                                  and entry["answer"] in Status.__members__):
        return f"{stage}: unknown answer {entry['answer']!r}"
    actions = entry.get("actions", [])
    for action in actions if isinstance(actions, list) else [actions]:
        name = action[0] if isinstance(action, list) and action else None
        if not isinstance(name, str) or not _fits(action[1:], _ACTIONS.get(name, ("?",))):
            return f"{stage}: malformed action {action!r}"
    return None


def _fits(values: Any, kinds: Sequence[str]) -> bool:
    """Whether `values` is a list of as many values, each of its kind: text (no NUL: it was a C
    string), chunk (any text), int, lines (a list of text), address (as `_address` reads it);
    `?` also takes null."""
    if not isinstance(values, list) or len(values) != len(kinds):
        return False
    for value, kind in zip(values, kinds, strict=True):
        if value is None and kind.endswith("?"):
            continue
        kind = kind.rstrip("?")
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "lines":
            ok = isinstance(value, list) and _fits(value, ["text"] * len(value))
        elif kind == "address":
            ok = value is None or _is_address(value)
        else:
            ok = isinstance(value, str) and (kind == "chunk" or "\0" not in value) and (
                _encodes(value))
        if not ok:
            return False
    return True


def _encodes(text: str) -> bool:
    """Whether `text` gives back bytes (a lone surrogate other than surrogateescape's does not)."""
    try:
        _raw(text)
    except UnicodeEncodeError:
        return False
    return True


def _is_address(value: Any) -> bool:
    if isinstance(value, list) and value[:1] == ["unix"]:
        return _fits(value[1:], ("text",))
    if not (isinstance(value, list) and value[:1] in (["inet"], ["inet6"])
            and _fits(value[1:], ("text", "int")) and 0 <= value[2] <= 0xFFFF):
        return False
    try:
        _address(value)
    except ValueError:
        return False
    return True


def _whole(entries: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """The entries of a file whose last line was cut short (a writer killed mid-write), without
    the last message unless what is left of it says it was over. (Without such a line, a
    `.part` file holds whole messages: the recorder hands a connection's lines over only at the
    end of a message, at the next MAIL, and at close.)"""
    owner, count = _split(entries)
    staged = [i for i, (e, n) in enumerate(zip(entries, owner, strict=True))
              if n == count - 1 and e["stage"] not in _CONNECTION]
    if not staged:
        return tuple(entries)
    last = entries[staged[-1]]
    if "answer" in last and (last["stage"] == "eom" or (last["stage"] != "rcpt"
                                                        and last["answer"] in _ENDING)):
        return tuple(entries)
    return tuple(entries[: staged[0]])


def _inputs(head: dict[str, Any], entries: Sequence[dict[str, Any]]) -> tuple[
        ClientInfo, tuple[tuple[Envelope, bytes], ...]]:
    leading = bool(int(head.get("protocol", 0)) & ProtocolOpts.HDR_LEADSPC)
    connect = next((e for e in entries if e["stage"] == "connect"), None)
    # the last HELO: the one the messages came under, when a refused one was said again
    helo = next((e for e in reversed(entries) if e["stage"] == "helo"), None)
    unknown = [e["args"][0] for e in entries if e["stage"] == "unknown"]
    owner, count = _split(entries)
    groups: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    for entry, number in zip(entries, owner, strict=True):
        if entry["stage"] not in _CONNECTION:
            groups[number].append(entry)
    macros = {stage: _macros(e) for stage, e in (("connect", connect), ("helo", helo)) if e}
    client = ClientInfo(connect["args"][0] if connect else "localhost",
                        _address(connect["args"][1]) if connect else None,
                        helo["args"][0] if helo else None, tuple(unknown), macros,
                        default_macros=False)
    return client, tuple(_message(group, leading) for group in groups)


def _macros(entry: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in (entry.get("macros") or {}).items() if v is not None}


def _message(entries: list[dict[str, Any]], leading: bool) -> tuple[Envelope, bytes]:
    """A message's envelope and bytes (no MAIL recorded, for a filter without `on_mail`: the
    null sender)."""
    mail = entries[0] if entries[0]["stage"] == "mail" else {"args": ["", ""]}
    rcpts = [e for e in entries if e["stage"] == "rcpt"]
    macros: dict[str, dict[str, str]] = {}
    for entry in entries:
        if entry["stage"] in ("mail", "rcpt", "data", "eoh", "eom"):
            macros.setdefault(entry["stage"], _macros(entry))
    head = b"".join(
        (e["args"][0] + ":" + ("" if leading else " ") + e["args"][1]).encode(
            "utf-8", "surrogateescape").replace(b"\n", b"\r\n") + b"\r\n"
        for e in entries if e["stage"] == "header")
    body = b"".join((e["args"][0] or "").encode("utf-8", "surrogateescape")
                    for e in entries if e["stage"] == "body")
    envelope = Envelope(mail["args"][0], tuple(Recipient(*r["args"]) for r in rcpts),
                        mail["args"][1], macros, default_macros=False)
    return envelope, head + b"\r\n" + body


def _closers(entries: Sequence[dict[str, Any]]) -> set[int]:
    """The entries whose refusal ends the connection: a connect, and the last HELO. libmilter
    goes on after any refusal, but an MTA does not after a refused connect, nor after a refused
    HELO unless the client says HELO again; a refused unknown command is that one's only."""
    helos = [i for i, e in enumerate(entries) if e["stage"] == "helo"]
    return {i for i, e in enumerate(entries) if e["stage"] == "connect"} | set(helos[-1:])


def _outcomes(entries: Sequence[dict[str, Any]],
              answers: Sequence[Answer | None]) -> tuple[Outcome, ...]:
    """Per message (`_split`), from each entry's answer (None: none). A refused connection
    gives its verdict to each message from there on (one outcome, if none); a refused HELO or
    unknown command that ends nothing is a line of the message it came with."""
    owner, count = _split(entries)
    closers = _closers(entries)
    groups: list[list[tuple[str, str, Answer]]] = [[] for _ in range(count)]
    commands: list[list[str]] = [[] for _ in range(max(count, 1))]
    stage = ""  # the last one answered: where a connection without messages stands
    for index, (entry, answer, number) in enumerate(zip(entries, answers, owner, strict=True)):
        if answer is None:
            continue
        stage, detail = entry["stage"], _detail(entry)
        if stage not in _CONNECTION:
            groups[number].append((stage, detail, answer))
        elif answer.status in ENDS_MESSAGE and index in closers and number < max(count, 1):
            done = [_outcome(*pair) for pair in zip(groups[:number], commands, strict=False)]
            return (*done, *[_outcome([(stage, detail, answer)])] * (max(count, 1) - number))
        elif answer.status in ENDS_MESSAGE:  # a refusal after the last message: shown with it
            commands[min(number, len(commands) - 1)].append(_refused(stage, detail, answer))
    if not groups:
        return (Outcome(Status.CONTINUE, stage, commands=tuple(commands[0])),)
    return tuple(_outcome(*pair) for pair in zip(groups, commands, strict=True))


def _detail(entry: dict[str, Any]) -> str:
    args = entry.get("args") or [""]
    return bracket(args[0]) if entry["stage"] == "rcpt" else str(args[0])


def _play(conn: MilterConnection, entries: Sequence[dict[str, Any]],
          answers: dict[int, Answer | None]) -> None:
    """Send `entries` on `conn` as the MTA did, minding the new answers: a message the filter
    now ends early gets no more commands, a refused connection (`_closers`) none."""
    owner, _ = _split(entries)
    closers = _closers(entries)
    in_message = ended = skipping = False
    current = -1
    for index, entry in enumerate(entries):
        stage = entry["stage"]
        if stage not in _CONNECTION and owner[index] != current:  # a new message
            if in_message:
                conn.abort()
            current, in_message, ended, skipping = owner[index], True, False, False
        if (ended and stage not in _CONNECTION) or (skipping and stage == "body"):
            continue
        if stage in ("connect", "helo", "mail", "rcpt", "data", "eoh", "eom"):
            conn.macros(Step(stage), _macros(entry))
        args = entry.get("args") or []
        if stage == "connect":
            answer = conn.connect(args[0], _address(args[1]))
        elif stage in ("mail", "rcpt"):  # the parameters as recorded, joined by one space
            answer = getattr(conn, stage)(args[0], args[1].split(" ") if args[1] else [])
        elif stage == "body":  # in pieces the wire client takes, if an MTA sent more at once
            data = _raw(args[0] or "")
            for offset in range(0, max(len(data), 1), MAX_DATA):
                answer = conn.body(data[offset : offset + MAX_DATA])
                if answer is not None and answer.status is not Status.CONTINUE:
                    break
        else:
            answer = getattr(conn, stage)(*args)
        answers[index] = answer
        if answer is None:
            continue
        skipping = skipping or (stage == "body" and answer.status is Status.SKIP)
        if stage in _CONNECTION:
            if answer.status in ENDS_MESSAGE and index in closers:
                return
        elif stage == "eom":
            in_message = False
        elif stage != "rcpt" and answer.status in ENDS_MESSAGE:
            ended, in_message = True, False
    if in_message:
        conn.abort()
    conn.quit()


def recording_files(paths: Iterable[str]) -> list[Path]:
    """The recording files named or found (sorted) in the directories named."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir()
                                if p.name.endswith((SUFFIX, PARTIAL)) and p.is_file()))
        else:
            found.append(path)
    return found


def _bodiless(entries: Sequence[dict[str, Any]]) -> list[bool]:
    """Per message: whether its body was recorded as sizes only (`--record-body no`), so that
    a new outcome may differ for want of it."""
    owner, count = _split(entries)
    out = [False] * max(count, 1)
    for entry, number in zip(entries, owner, strict=True):
        if entry["stage"] == "body" and entry["args"][0] is None:
            out[number] = True
    return out


def cmd_replay(args: argparse.Namespace, driver: MtaDriver) -> int:
    """`pymilterkit replay`: each recorded message's outcome beside the new one, a summary;
    0 when nothing changed, 1 when something did or failed. A message recorded without its
    body whose outcome differs is `unsure`, not `changed`: the filter was sent empty chunks."""
    report: list[dict[str, Any]] = []
    for path in recording_files(args.recordings):
        try:
            recording = Recording.load(path)
        except ConfigurationError as exc:
            report.append({"file": str(path), "message": 0, "result": "failed",
                           "error": str(exc)})
            continue
        error = None
        try:
            new: Sequence[Outcome | None] = recording.replay(driver)
        except (MilterError, OSError) as exc:
            new, error = [None] * len(recording.recorded), f"{type(exc).__name__}: {exc}"
        bodiless = _bodiless(recording.entries)
        for number, (old, now) in enumerate(zip(recording.recorded, new, strict=True), 1):
            envelope, raw = recording.messages[number - 1] if recording.messages else (None, b"")
            subject = re.search(rb"^Subject:[ \t]*(.*?)\r?$", raw, re.M | re.I)
            result = "failed" if now is None else "same" if now == old else (
                "unsure" if bodiless[number - 1] else "changed")
            item: dict[str, Any] = {
                "file": str(path), "message": number,
                "sender": envelope.sender if envelope else None,
                "subject": subject and subject.group(1).decode("utf-8", "replace"),
                "result": result, "recorded": old.lines(),
                "new": None if now is None else now.lines()}
            if error:
                item["error"] = error
            elif result == "unsure":
                item["note"] = ("recorded without its body (--record-body no): the filter "
                                "was sent empty body chunks")
            report.append(item)
    counts = {k: sum(r["result"] == k for r in report)
              for k in ("same", "changed", "failed", "unsure")}
    if args.json:
        json.dump({"messages": report, "summary": counts}, sys.stdout, indent=2)
        print()
    else:
        _print_report(report, counts)
    return 0 if counts["changed"] == counts["failed"] == 0 else 1


def _print_report(report: list[dict[str, Any]], counts: dict[str, int]) -> None:
    for item in report:
        subject = item.get("subject")
        where = _printable(" ".join(filter(None, (
            Path(item["file"]).name, f"#{item['message']}", item.get("sender"),
            subject and repr(subject)))))
        old, new = ([_printable(line) for line in item.get(key) or []]
                    for key in ("recorded", "new"))
        if item["result"] == "same":
            print(f"same     {where}: {old[0]}")
            continue
        why = item.get("error") or item.get("note")
        print(f"{item['result']:<8} {where}" + (f": {_printable(why)}" if why else ""))
        width = max((len(line) for line in old), default=0)
        width = min(max(width, len("recorded")), 60)
        print(f"    {'recorded':<{width}} | new")
        for index in range(max(len(old), len(new))):
            left = old[index] if index < len(old) else ""
            right = new[index] if index < len(new) else ""
            mark = " " if left == right else "*"
            print(f"  {mark} {left:<{width}} | {right}")
    print(f"{sum(counts.values())} message(s): {counts['same']} same, {counts['changed']} "
          f"changed, {counts['failed']} failed"
          + (f", {counts['unsure']} unsure (no body recorded)" if counts["unsure"] else ""))


def _printable(text: str) -> str:
    """`text` as standard output can write it: what its encoding lacks (a lone surrogate, which
    stands for a byte that is not UTF-8) as a backslash escape (`\\udcff`)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)
