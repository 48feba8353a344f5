"""What `pymilterkit send` does: drive a running milter like an MTA and show its answers.

Its arguments, usage text and exit statuses are defined with the command line in
`pymilterkit.__main__`, which imports this module only when `send` runs.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import enum
import json
import mailbox
import os
import sys
from collections.abc import Iterator
from ipaddress import ip_address
from typing import IO, Any

from .._errors import MilterError
from .._flags import Status
from .._types import InetAddress, UnixAddress
from ._client import MilterClient
from ._envelope import MACRO_STAGES, ClientInfo, Envelope, Recipient
from ._results import Answer, ConnectionResult, MessageResult, Modification, Step

__all__ = ["cmd_send", "result_to_json"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


# -- message sources ----------------------------------------------------------------------------


def _sources(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        if path == "-":
            yield "<stdin>", sys.stdin.buffer.read()
        elif os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if os.path.isfile(full):
                    yield from _file(full)
        else:
            yield from _file(path)


def _file(path: str) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as handle:
        head = handle.read(5)
    if head == b"From ":
        box = mailbox.mbox(path, create=False)
        try:
            for number, key in enumerate(box.keys(), 1):
                yield f"{path}#{number}", box.get_bytes(key)
        finally:
            box.close()
        return
    with open(path, "rb") as handle:
        yield path, handle.read()


# -- JSON ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Step):
        return value.value
    if isinstance(value, enum.IntFlag):
        return [flag.name for flag in type(value) if flag and flag in value]
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        if isinstance(value, Modification):
            out["type"] = type(value).__name__
        for field in dataclasses.fields(value):
            if not field.compare:
                continue
            out[field.name] = _jsonable(getattr(value, field.name))
        return out
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def result_to_json(result: ConnectionResult) -> dict[str, Any]:
    """A connection result as JSON-ready data (bytes as base64, enums by name)."""
    data: dict[str, Any] = _jsonable(result)
    return data


# -- text ---------------------------------------------------------------------------------------


def _flags(value: enum.IntFlag) -> str:
    names = [flag.name or "" for flag in type(value) if flag and flag in value]
    return "|".join(names) or "none"


def _answer_line(answer: Answer) -> str:
    head = f"{answer.step.value}"
    if answer.detail:
        head += f" {answer.detail}"
    text = f"{head}: {answer.status.name.lower()}"
    if answer.status is Status.NOREPLY:
        text = f"{head}: (no reply expected)"
    if answer.reply is not None:
        text += f" [{' / '.join(str(answer.reply).splitlines())}]"
    return text


def _modification_line(mod: Modification) -> str:
    kind = type(mod).__name__
    fields = dataclasses.asdict(mod)
    if "body" in fields:
        body = fields["body"]
        return f"{kind}: {len(body)} bytes: {body[:60]!r}{'...' if len(body) > 60 else ''}"
    parts = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"{kind}({parts})"


def _print_connection(result: ConnectionResult, out: IO[str]) -> None:
    neg = result.negotiation
    print(f"negotiation: version {neg.version}", file=out)
    print(f"  actions:  {_flags(neg.actions)}", file=out)
    print(f"  protocol: {_flags(neg.protocol)}", file=out)
    for stage, names in sorted(neg.macros.items()):
        print(f"  macros at {stage.name.lower()}: {' '.join(names)}", file=out)
    for answer in (result.connect, result.helo, *result.unknown):
        if answer is not None:
            print(_answer_line(answer), file=out)


def _print_message(msg: MessageResult, out: IO[str]) -> None:
    for answer in msg.answers:
        print(_answer_line(answer), file=out)
        for mod in answer.modifications:
            print(f"  {_modification_line(mod)}", file=out)
    verdict = f"verdict: {msg.status.name} at {msg.stage.value}"
    if msg.reply is not None:
        verdict += f" ({' / '.join(str(msg.reply).splitlines())})"
    print(verdict, file=out)


# -- the command --------------------------------------------------------------------------------


_MACRO_STEPS = [step.value for step in MACRO_STAGES]


def _client_info(args: argparse.Namespace) -> tuple[ClientInfo, dict[str, dict[str, str]]]:
    address: InetAddress | UnixAddress | None
    if args.client_addr in ("", "unknown"):
        address = None
    elif args.client_addr.startswith("/"):
        address = UnixAddress(args.client_addr)
    else:
        address = InetAddress(ip_address(args.client_addr), args.client_port)
    macros: dict[str, dict[str, str]] = {}
    for item in args.macro:
        stage, _, rest = item.partition(":")
        name, eq, value = rest.partition("=")
        if not eq or not name:
            raise argparse.ArgumentTypeError(f"--macro wants STAGE:NAME=VALUE, got {item!r}")
        if stage not in _MACRO_STEPS:
            raise argparse.ArgumentTypeError(
                f"--macro {item!r}: no macros are sent at {stage!r} (one of "
                f"{', '.join(_MACRO_STEPS)})")
        macros.setdefault(stage, {})[name] = value
    client_macros = {k: v for k, v in macros.items() if k in ("connect", "helo")}
    return ClientInfo(
        hostname=args.client_host,
        address=address,
        helo=args.helo or None,
        unknown=tuple(args.unknown),
        macros=client_macros,
    ), {k: v for k, v in macros.items() if k not in ("connect", "helo")}


def cmd_send(args: argparse.Namespace) -> int:
    """Run `pymilterkit send` with its parsed arguments (defined in `pymilterkit.__main__`)."""
    try:
        client_info, message_macros = _client_info(args)
        client = MilterClient(args.socket, timeout=args.timeout, client=client_info)
    except (MilterError, ValueError, argparse.ArgumentTypeError) as exc:
        print(f"pymilterkit send: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    envelope = Envelope(
        sender=args.sender,
        recipients=tuple(Recipient(r) for r in args.to),
        sender_params=args.sender_params,
        macros=message_macros,
    )
    try:
        sources = list(_sources(args.messages))
    except OSError as exc:
        print(f"pymilterkit send: error: cannot read {exc.filename}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_USAGE
    if not sources:
        print("pymilterkit send: error: no messages found", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout
    single = len(sources) == 1
    progress = not single and not args.quiet
    tty = sys.stderr.isatty()
    verdicts: collections.Counter[str] = collections.Counter()
    failures: list[tuple[str, str]] = []
    documents: list[dict[str, Any]] = []
    refused = False
    for number, (name, raw) in enumerate(sources, 1):
        try:
            result = client.run_connection([(envelope, raw)])
        except MilterError as exc:
            failures.append((name, str(exc)))
            refused = True
            documents.append({"source": name, "error": str(exc)})
            line = f"{name}: FAILED: {exc}"
            if not args.json:
                print(line, file=out)
        else:
            msg = result.messages[0]
            verdicts[msg.status.name] += 1
            if msg.status not in (Status.CONTINUE, Status.ACCEPT):
                refused = True
            documents.append({"source": name, **result_to_json(result)})
            if not args.json:
                if single or args.verbose:
                    if not single:
                        print(f"== {name}", file=out)
                    _print_connection(result, out)
                    _print_message(msg, out)
                else:
                    mods = len(msg.modifications)
                    print(f"{name}: {msg.status.name} at {msg.stage.value}"
                          f" ({mods} modification{'s' if mods != 1 else ''})", file=out)
                if args.diff:
                    print(msg.diff(), end="", file=out)
        if progress:
            text = f"[{number}/{len(sources)}] {name}"
            if tty:
                print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)
            else:
                print(text, file=sys.stderr, flush=True)
    if progress and tty:
        print(file=sys.stderr)
    summary = {
        "messages": len(sources),
        "verdicts": dict(sorted(verdicts.items())),
        "failures": [{"source": s, "error": e} for s, e in failures],
    }
    if args.json:
        json.dump({"messages": documents, "summary": summary}, out, indent=2)
        print(file=out)
    elif not single:
        counted = ", ".join(f"{count} {name.lower()}" for name, count in sorted(verdicts.items()))
        print(f"summary: {len(sources)} messages: {counted or 'none answered'}; "
              f"{len(failures)} failed", file=out)
        for source, error in failures:
            print(f"  failed: {source}: {error}", file=out)
    # A reader gone early (`| head -1`) shows here, as BrokenPipeError, not at the interpreter's
    # final flush (which Python 3.14 reports with exit status 120).
    out.flush()
    return EXIT_REFUSED if refused else EXIT_OK
