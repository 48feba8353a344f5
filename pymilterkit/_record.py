"""Recording (`--record DIR`): what a filter saw and did, one file per connection.

Theory of operation
-------------------
`Recorder` is recording's part in the dispatch path (`SessionRules.recorder`), chosen when the
callbacks are built. A sampled connection's session gets a `RecordingBackend` (each action is
noted, then carried out), and its stage callbacks note each call (`Recorder.stage`'s `note`
and `finish`, called inline): the stage's arguments, the macros the MTA sent with it, the
answer and the time; other connections' calls take the plain path. libmilter's
threads only note in memory and, at the end of each message and at close, put the
connection's new lines on a bounded queue (dropped and counted when it is full). A thread
(`Feed`) serializes what is queued in one batch every 50 ms and hands it through a pipe to a
writer process of this serving process (started at the
first message, niced, on any CPU, in a session of its own; it ends at end of file), which
encodes the JSON and appends it to `NAME.milterlog.part`, renamed `NAME.milterlog` at close
(`Writer`). So neither the disk nor the encoding holds up a stage (encoding in a thread of
this process kept the GIL from the stage callbacks: 40% of the throughput, measured). A worker
killed mid-connection leaves a `.part` file, complete up to its last message. A failure (full
disk, unwritable directory) is logged once and changes no answer.

Format, version 1 (docs/guides/record-replay.md): JSON lines, ASCII, text as UTF-8 with
undecodable bytes as lone surrogates (`surrogateescape`). The first line describes the
connection (`format`, `version`, `filter`, `pid`, `time`, `body`, `protocol`); then one line
per stage (`stage`, `args`, `macros`, `answer`, `ms`, `actions`); the last one is `{"end": ..}`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import marshal
import math
import os
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError
from ._flags import Status
from ._protocol import BY_METHOD, ActionInfo, BackendWrapper, SessionBackend
from ._types import EsmtpParams, InetAddress, UnixAddress

if TYPE_CHECKING:
    from ._session import MilterSession

__all__ = ["FORMAT", "PARTIAL", "SUFFIX", "VERSION", "RecordOptions", "Recorder", "Writer"]

logger = logging.getLogger("pymilterkit")

FORMAT, VERSION = "pymilterkit-record", 1
SUFFIX, PARTIAL = ".milterlog", ".milterlog.part"
_QUEUE = 4096  # chunks (a message's lines, or a close) waiting for the writer
_POLL = 0.05  # s between the writer's looks at the queue: few thread switches under load
_RESCAN = 10.0  # s between looks at the directory's size (other workers write there too)
_NAMES = {int(s): s.name for s in Status}
_NUMBERS = itertools.count(1)
"""The counter in recording names: one per process, so that a second `Recorder` (a `Milter`
run again in the process) names no file as the first did within the same second."""
_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class RecordOptions:
    """Where and what `--record` writes: `directory`, the share of connections recorded
    (`sample`, drawn per connection), whether bodies are kept (`body`; else their sizes), and
    the size in MiB of recordings in the directory past which no new file is started."""

    directory: str
    sample: float = 1.0
    body: bool = True
    max_mb: float = 1024.0

    def __post_init__(self) -> None:
        directory = os.fspath(self.directory)
        if not isinstance(directory, str) or not directory:
            raise ConfigurationError(f"record: directory must be a path, got {directory!r}")
        object.__setattr__(self, "directory", directory)
        for name, low, high in (("sample", 0.0, 1.0), ("max_mb", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                low <= value <= high and math.isfinite(value) and (name == "sample" or value)
            ):
                raise ConfigurationError(
                    f"record: {name} must be a number {'from 0 to 1' if high == 1 else '> 0'}"
                    f": {value!r}"
                )
        if not isinstance(self.body, bool):
            raise ConfigurationError(f"record: body must be True or False: {self.body!r}")

    @classmethod
    def from_flags(cls, directory: str | None, sample: float, body: str,
                   max_mb: float) -> RecordOptions | None:
        """The options `--record DIR --record-sample F --record-body yes|no
        --record-max-mb N` give (None without `--record`; its parts alone are a mistake)."""
        if directory is None:  # (the flags' defaults are the fields')
            given = [flag for flag, changed in (
                ("--record-sample", sample != cls.sample), ("--record-body", (body == "yes")
                 != cls.body), ("--record-max-mb", max_mb != cls.max_mb)) if changed]
            if given:
                raise ConfigurationError(
                    f"{', '.join(given)} without --record DIR: nothing would be recorded")
            return None
        return cls(directory, sample, body == "yes", max_mb)


def _jsonable(value: object) -> object:
    """What `json` cannot write itself, as text (bytes: `surrogateescape`)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, InetAddress):
        return ["inet6" if value.ip.version == 6 else "inet", str(value.ip), value.port]
    if isinstance(value, UnixAddress):
        return ["unix", value.path]
    if isinstance(value, EsmtpParams):
        return str(value)
    raise TypeError(f"cannot record {type(value).__name__}")


_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _json(value: Any) -> str:
    """`value` as JSON: the few types a recording holds, written without `json`'s generic
    machinery (the writer runs on the same CPU as the filter)."""
    kind = value.__class__
    if kind is str:
        return _quote(value)
    if kind is bytes:
        return _quote(value.decode("utf-8", "surrogateescape"))
    if kind is EsmtpParams:
        return _quote(str(value))
    if value is None:
        return "null"
    if kind is list or kind is tuple:
        return "[" + ",".join(map(_json, value)) + "]"
    if kind is dict:
        return "{" + ",".join(_quote(k) + ":" + _json(v) for k, v in value.items()) + "}"
    if kind is bool:
        return "true" if value else "false"
    if kind is float or kind is int:
        return repr(value)
    if isinstance(value, int):  # an IntEnum
        return str(int(value))
    return _json(_jsonable(value))


def _text(value: Any) -> str:
    """A string of a recorded line as JSON (bytes: `surrogateescape`); else `_json`."""
    kind = value.__class__
    if kind is bytes:
        return _quote(value.decode("utf-8", "surrogateescape"))
    if kind is str:
        return _quote(value)
    return _json(value)


def _texts(values: Any) -> list[str]:
    """`_text` of each value, bytes (the common case) decoded inline: a call less for each."""
    return [_quote(v.decode("utf-8", "surrogateescape")) if v.__class__ is bytes else _text(v)
            for v in values]


_ANSWERS = {number: f',"answer":"{name}","ms":' for number, name in _NAMES.items()}
_HEADS: dict[str, str] = {}  # '{"stage":"rcpt","args":[' by stage


def _encode(entry: Any, body: bool) -> str:
    """One recorded line (in the writer process): a dict as it is, a stage's list
    (stage, args, macros, answer, seconds, actions) in the documented keys. The writer's CPU
    is mostly this function's, and it shares the machine with the filter: it concatenates
    and calls as little as it can."""
    if entry.__class__ is dict:
        return _json(entry) + "\n"
    stage, args, macros, answer, elapsed, actions = entry
    if stage == "body":  # the chunk, or its size only (--record-body no)
        data = args[0]
        head = f'{{"stage":"body","size":{data if data.__class__ is int else len(data)},"args":['
        args = (data if body and data.__class__ is not int else None,)
    else:
        head = _HEADS.get(stage) or _HEADS.setdefault(stage, '{"stage":"' + stage + '","args":[')
    out = head + ",".join(_texts(args)) + "]" if args else head + "]"
    if macros:  # names and values alternate; an odd one out is left out
        texts = _texts(macros)
        pairs = zip(texts[::2], texts[1::2], strict=False)
        out += ',"macros":{' + ",".join(map(":".join, pairs)) + "}"
    elif macros is not None:
        out += ',"macros":{}'
    if answer is not None:
        out += (_ANSWERS.get(answer) or f',"answer":{_quote(str(answer))},"ms":') + (
            "%.3f" % (elapsed * 1000))
    if actions is not None:  # each [method, *args]
        out += ',"actions":[' + ",".join([
            "[" + ",".join(_texts(action)) + "]" if action.__class__ is list else _json(action)
            for action in actions]) + "]"
    return out + "}\n"


class Writer:
    """Writes recordings into the directory: the body of the writer process."""

    def __init__(self, options: RecordOptions) -> None:
        self.options = options
        self.failing = False
        self.files: dict[str, int] = {}  # open .part files (-1: given up)
        self.used = 0
        self.scanned = -math.inf
        directory = options.directory
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
            if os.stat(directory).st_mode & 0o077:
                os.chmod(directory, 0o700)  # recordings hold mail: owner only
        except OSError as exc:
            self._fail(f"cannot use directory {directory}: {exc.strerror}")

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.options.directory, name + suffix)

    def _fail(self, why: str) -> None:
        if not self.failing:
            self.failing = True
            logger.warning("record: %s; recording is skipped until it works again", why)

    def handle(self, name: str, lines: list[Any], final: bool) -> None:
        """Append a connection's new `lines` to its file (`final`: complete it)."""
        try:
            self._write(name, lines, final)
        except Exception as exc:  # noqa: BLE001 - a recording never stops the milter
            fd = self.files.pop(name, -1)
            self.files[name] = -1
            if fd >= 0:
                os.close(fd)
                _remove(self._path(name, PARTIAL))  # maybe torn: gone rather than wrong
            self._fail(f"cannot write {self._path(name, SUFFIX)}: "
                       f"{getattr(exc, 'strerror', None) or exc}")
        if final:
            self.files.pop(name, None)

    def batch(self, parts: list[_Part]) -> None:
        """Hand a batch of parts to `handle`, a connection's parts in it as one."""
        joined: dict[str, list[list[Any]]] = {}
        closed = set()
        for name, lines, final in parts:
            joined.setdefault(name, []).append(lines)
            if final:
                closed.add(name)
        for name, chunks in joined.items():
            self.handle(name, [line for lines in chunks for line in lines], name in closed)

    def close(self) -> None:
        """Connections still open: left as .part."""
        for fd in self.files.values():
            if fd >= 0:
                os.close(fd)
        self.files.clear()

    def _room(self) -> bool:
        """Whether the directory is below the size cap (looked at every `_RESCAN` s)."""
        now = time.monotonic()
        if now - self.scanned >= _RESCAN:
            self.scanned = now
            self.used = 0
            with os.scandir(self.options.directory) as entries:
                for entry in entries:
                    if entry.name.endswith((SUFFIX, PARTIAL)):
                        # another worker's writer may rename or remove it meanwhile
                        with contextlib.suppress(FileNotFoundError):
                            if entry.is_file():
                                self.used += entry.stat().st_size
        if self.used < self.options.max_mb * _MIB:
            return True
        self._fail(f"{self.options.directory} holds {self.options.max_mb:g} MiB of recordings "
                   f"(--record-max-mb)")
        return False

    def _write(self, name: str, lines: list[Any], final: bool) -> None:
        fd = self.files.get(name)
        if fd == -1:
            return
        data = "".join([_encode(line, self.options.body) for line in lines]).encode("ascii")
        starts = fd is None
        if fd is None:
            if not self._room():
                self.files[name] = -1
                return
            fd = self.files[name] = os.open(
                self._path(name, PARTIAL),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        self.used += len(data)
        if final:
            os.close(self.files.pop(name))
            os.rename(self._path(name, PARTIAL), self._path(name, SUFFIX))
        # Only a new file written says recording has resumed: lines for one begun before the
        # cap or the failure do not (clearing then would log the next refusal again).
        if starts and self.failing:
            self.failing = False
            logger.info("record: writing recordings again")


class Feed:
    """The serving process's side: parts of recordings (a connection's new lines), handed by a
    thread of its own to the writer process (started at the first part) through a pipe, in
    batches serialized at once (`_pack`)."""

    def __init__(self, options: RecordOptions) -> None:
        self.options = options
        self.queue: collections.deque[_Part] = collections.deque()
        self.stopping = threading.Event()
        self.dropped = 0
        """Parts not queued because the queue was full (their connections are cut short)."""
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def put(self, part: _Part) -> bool:
        """Queue a part (its lines are not changed after); never waits."""
        if self.thread is None:
            with self.lock:
                if self.thread is None:
                    self.thread = threading.Thread(
                        target=self._run, name="pymilterkit-record", daemon=True)
                    self.thread.start()
        if len(self.queue) >= _QUEUE:
            self.dropped += 1
            return False
        self.queue.append(part)  # no lock, no wake-up: the thread polls
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Hand over what is queued, then end the writer (at a process's stop)."""
        if self.thread is not None:
            self.stopping.set()
            self.thread.join(timeout)
        if self.dropped:
            logger.warning("record: %d part(s) of recordings dropped: the writer could not "
                           "keep up (those files stay .part or are missing)", self.dropped)

    def _run(self) -> None:
        o = self.options
        try:  # its own session: the process group's signals are not for it; it ends at EOF
            writer = subprocess.Popen(
                [sys.executable, "-c", _WRITER, o.directory, str(int(o.body)), repr(o.max_mb)],
                stdin=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            logger.warning("record: cannot start the writer process: %s", exc)
            self.queue.clear()
            return
        assert writer.stdin is not None
        pending, stopping = self.queue, self.stopping
        try:
            while pending or not stopping.is_set():
                # A look every _POLL s, queued or not: writing as parts come would hand the
                # GIL to and from libmilter's threads at every message.
                stopping.wait(_POLL)
                if not pending:
                    continue
                data = _pack([pending.popleft() for _ in range(len(pending))])
                if data is not None:
                    writer.stdin.write(_FRAME.pack(len(data)) + data)
                    writer.stdin.flush()
        except OSError as exc:
            logger.warning("record: the writer process is gone (%s); recording stops", exc)
        finally:
            with contextlib.suppress(OSError):
                writer.stdin.close()
            try:
                writer.wait(10)
            except subprocess.TimeoutExpired:
                writer.kill()


_Part = tuple[str, list[Any], bool]  # a connection's name, its new lines, whether it closed
_FRAME = struct.Struct("=I")


def _pack(parts: list[_Part]) -> bytes | None:
    """A batch of parts for the writer process, by `marshal` (the same Python reads it; a third
    of pickle's cost per part, batched). A batch holding other types (an action's argument of
    a str subclass, an enum) is made plain first: the writer needs no class of the filter's.
    None (logged) if even that fails: the batch is dropped, the feed goes on."""
    try:
        return marshal.dumps(parts)
    except ValueError:
        pass
    try:
        return marshal.dumps(_plain(parts))
    except Exception:  # an argument whose str() raises: a recording never stops the milter
        logger.exception("record: could not hand over %d part(s) of recordings", len(parts))
        return None


def _plain(value: Any) -> Any:
    """`value` with the types marshal refuses turned into the ones it takes (as JSON would
    write them: a subclass as its base type, an address as its list, anything else as text)."""
    kind = value.__class__
    if value is None or kind in (str, bytes, int, float, bool):
        return value
    if isinstance(value, list | tuple):
        return (list if isinstance(value, list) else tuple)(map(_plain, value))
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return bytes(value)
    for base in (bool, int, float):  # bool before int: a bool is an int
        if isinstance(value, base):
            return base(value)
    try:
        return _plain(_jsonable(value))
    except TypeError:
        return str(value)
# The writer process's program (not `-m pymilterkit._record`: the package imports this module
# first, and runpy warns about that on every start).
_WRITER = "import sys; from pymilterkit._record import _main; _main(sys.argv[1:])"


def _main(argv: list[str]) -> None:
    """The writer process: frames of batched parts (`_pack`) on stdin, until EOF."""
    logging.basicConfig(format="%(asctime)s pymilterkit[%(process)d] %(levelname)s %(message)s")
    with contextlib.suppress(OSError):  # spare time of any CPU, not the filter's
        os.nice(10)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    writer = Writer(RecordOptions(argv[0], 1.0, argv[1] == "1", float(argv[2])))
    source = sys.stdin.buffer
    while len(head := source.read(_FRAME.size)) == _FRAME.size:
        data = source.read(_FRAME.unpack(head)[0])
        writer.batch(marshal.loads(data))
    writer.close()


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class _Log:
    """One recorded connection: its lines not yet handed to the writer, the stage running
    (a list: stage, args, macros, answer, seconds, actions)."""

    __slots__ = ("cut", "entry", "lines", "name", "reads", "start")

    def __init__(self, name: str, head: dict[str, Any]) -> None:
        self.name = name
        self.lines: list[Any] = [head]
        self.entry: list[Any] | None = None
        self.reads = False  # macros are noted as the filter reads them (no list to be had)
        self.cut = False  # a part was dropped: the rest is not kept either
        self.start = 0.0  # when the stage running began (`perf_counter`)


class RecordingBackend(BackendWrapper):
    """A session backend that notes each action in its stage's line, then carries it out."""

    __slots__ = ("log",)

    def __init__(self, inner: SessionBackend, log: _Log) -> None:
        super().__init__(inner)
        self.log = log

    def act(self, action: ActionInfo, *args: Any) -> None:
        entry = self.log.entry
        if entry is not None:
            if entry[5] is None:
                entry[5] = []
            entry[5].append([action.method, *args])
        self.perform(action, *args)

    def getsymval(self, name: bytes) -> bytes | None:
        value = self.inner.getsymval(name)
        log = self.log
        entry = log.entry
        if log.reads and entry is not None:
            if entry[2] is None:
                entry[2] = []
            entry[2] += (name, value)
        return value


class Recorder:
    """Recording's part in the dispatch path (`SessionRules.recorder`)."""

    def __init__(self, options: RecordOptions, session_class: type[MilterSession]) -> None:
        self.options = options
        self.feed = Feed(options)
        self.numbers = _NUMBERS
        spec = session_class.negotiation()
        self.head = {"format": FORMAT, "version": VERSION,
                     "filter": f"{session_class.__module__}:{session_class.__qualname__}",
                     "pid": os.getpid(), "body": options.body, "protocol": int(spec.protocol)}

    def backend(self, inner: SessionBackend, session: MilterSession) -> SessionBackend:
        """A new session's backend: recording, for the sampled share of connections (their
        session's `_pmk_log` has its stage calls noted: `stage`)."""
        sample = self.options.sample
        if sample < 1.0 and random.random() >= sample:
            return inner
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{next(self.numbers):06d}"
        log = session._pmk_log = _Log(name, dict(self.head, pid=os.getpid(), time=time.time()))
        return RecordingBackend(inner, log)

    def stage(
        self,
        stage: str,
        convert: Callable[..., tuple[Any, ...]] | None,
        envelope: bool,
        macros: Callable[[Any, int], list[bytes] | None],
    ) -> Callable[[_Log, Any, Any, Any], list[Any] | None]:
        """What the stage callback calls for a recorded connection (its session's `_pmk_log`)
        before the method runs: `note(log, key, a, b)` notes the call and returns its line
        (None: it could not be noted, logged; the call goes on unrecorded). The callback puts
        a sync stage's answer and time in `line[3]` and `line[4]` and calls `message_ended`
        after on_eom; an async stage's answer comes to `answered`. Inline, not a call around
        the callback: that call cost recording a tenth of its instructions per message.

        Arguments are kept as libmilter gives them where the writer can decode them (header
        names and values, envelope addresses and parameters): no stage decodes them twice.
        """
        clock, flush, body = time.perf_counter, self._flush, self.options.body
        where = BY_METHOD[stage].macros
        slot = None if where is None else int(where)
        name, starts = stage.removeprefix("on_"), stage == "on_mail"
        raw, is_body, connect = stage == "on_header", stage == "on_body", stage == "on_connect"

        def note(log: _Log, key: Any, a: Any, b: Any) -> list[Any] | None:
            try:
                if starts and log.entry is not None:  # the last message was aborted
                    flush(log, False)
                if raw:
                    args: tuple[Any, ...] = (a or b"", b or b"")
                elif envelope:  # the address and the parameters' text, as the MTA sent them
                    args = (a[0] or b"", "")
                    if a[1] is not None:  # libmilter ends the array with NULL
                        params, index = [], 1
                        while (item := a[index]) is not None:
                            params.append(item)
                            index += 1
                        args = (args[0], b" ".join(params))
                elif is_body:  # the chunk, or its size only
                    args = convert(a, b) if body else (b,)  # type: ignore[misc]
                elif connect:  # the address as the JSON it becomes (marshal takes that)
                    host, address = convert(a, b)  # type: ignore[misc]
                    args = (host, None if address is None else _jsonable(address))
                else:
                    args = () if convert is None else convert(a, b)
                entry: list[Any] = [name, args, None if slot is None else macros(key, slot),
                                    None, None, None]
                log.reads = entry[2] is None
                log.lines.append(entry)
                log.entry = entry
            except Exception:  # a recording never changes an answer
                logger.exception("record: could not note %s", stage)
                return None
            log.start = clock()
            return entry

        return note

    def answered(self, session: MilterSession, stage: str, answer: int, elapsed: float) -> None:
        """An async stage's answer."""
        log: _Log | None = session._pmk_log
        entry = None if log is None else log.entry
        if log is not None and entry is not None:
            entry[3], entry[4] = int(answer), elapsed
            if stage == "on_eom":
                self._flush(log, False)

    def message_ended(self, log: _Log) -> None:
        """A recorded message's end (on_eom answered): its lines go to the writer."""
        self._flush(log, False)

    def _flush(self, log: _Log, final: bool) -> None:
        lines, log.lines, log.entry = log.lines, [], None
        if not log.cut and not self.feed.put((log.name, lines, final)):
            log.cut = True

    def closed(self, session: MilterSession) -> None:
        """The connection closed: its file is completed."""
        log: _Log | None = session._pmk_log
        if log is not None:
            session._pmk_log = None
            log.lines.append({"end": "close"})
            self._flush(log, True)

    def stop(self) -> None:
        """At the process's stop: write what is queued."""
        self.feed.stop()

