"""The recorder's options and writer: flags, TOML, permissions, whole files, failures."""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import math
import os
import stat
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import cast

import pytest

from pymilterkit import ConfigurationError, InetAddress, MilterSession, RecordOptions, Status
from pymilterkit.__main__ import _parser
from pymilterkit._config import parse_args
from pymilterkit._options import RunOptions
from pymilterkit._protocol import SessionBackend
from pymilterkit._record import (
    _FRAME,
    _QUEUE,
    _WRITER,
    Feed,
    Recorder,
    Writer,
    _encode,
    _pack,
    _plain,
)


def options_of(argv: list[str]) -> RunOptions:
    return RunOptions.from_args(parse_args(_parser(), ["run", "m:C", "--socket", "unix:/x",
                                                       *argv]), None)


def test_flags_and_toml_make_record_options(tmp_path: Path) -> None:
    assert options_of([]).record is None
    assert options_of(["--record", "/r"]).record == RecordOptions("/r")
    assert options_of(["--record", "/r", "--record-sample", "0.25", "--record-body", "no",
                       "--record-max-mb", "5"]).record == RecordOptions("/r", 0.25, False, 5.0)
    config = tmp_path / "c.toml"
    config.write_text('record = "/d"\nrecord-sample = 0.5\nrecord-body = "no"\n')
    assert options_of(["--config", str(config)]).record == RecordOptions("/d", 0.5, False)


def test_record_parts_without_record_are_a_mistake(tmp_path: Path) -> None:
    for argv in (["--record-sample", "0.1"], ["--record-body", "no"],
                 ["--record-max-mb", "5"]):
        with pytest.raises(ConfigurationError, match=f"{argv[0]} without --record DIR"):
            options_of(argv)
    config = tmp_path / "c.toml"
    config.write_text("record-sample = 0.5\n")
    with pytest.raises(ConfigurationError, match="--record-sample without --record DIR"):
        options_of(["--config", str(config)])


@pytest.mark.parametrize("kwargs", [{"sample": 1.5}, {"sample": -0.1}, {"max_mb": 0},
                                    {"body": "no"}, {"sample": True}, {"directory": ""}])
def test_bad_record_options_say_what_to_change(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="record: "):
        RecordOptions(**{"directory": "/r", **kwargs})  # type: ignore[arg-type]


def test_writer_writes_whole_private_files(tmp_path: Path) -> None:
    writer = Writer(RecordOptions(str(tmp_path / "r")))
    writer.handle("a", [["body", (b"\xff\r\n",), None, 0, 0.001, None]], False)
    writer.handle("b", [{"x": 1}], True)
    writer.close()
    directory = tmp_path / "r"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["a.milterlog.part", "b.milterlog"]
    part = json.loads((directory / "a.milterlog.part").read_text())
    assert part == {"stage": "body", "args": ["\udcff\r\n"], "size": 3, "answer": "CONTINUE",
                    "ms": 1.0}
    assert part["args"][0].encode("utf-8", "surrogateescape") == b"\xff\r\n"
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in directory.iterdir())


class Text(str):
    """An action's argument of a type marshal refuses (a str subclass)."""


class Kind(enum.IntEnum):
    ONE = 1


def test_types_marshal_refuses_are_made_plain_as_json_would_write_them() -> None:
    address = InetAddress(ipaddress.ip_address("192.0.2.1"), 25)
    value = [Text("x"), Kind.ONE, (True, b"b", None, 1.5), {"k": address}, object]
    assert _plain(value) == ["x", 1, (True, b"b", None, 1.5), {"k": ["inet", "192.0.2.1", 25]},
                             str(object)]
    assert [type(item) for item in _plain(value)[:2]] == [str, int]


def test_the_writer_process_takes_batches_of_either_kind_and_joins_a_connections_parts(
    tmp_path: Path,
) -> None:
    rcpt = ["rcpt", (b"<a@example.org>", ""), [b"i", b"Q1"], 0, 0.002, None]
    eom = ["eom", (), None, 0, 0.001, [["add_header", Text("X-Tag"), "1"]]]
    plain = _pack([("a", [{"x": 1}, rcpt], False), ("b", [{"y": 2}], True),
                   ("a", [rcpt], False)])
    other = _pack([("a", [eom, {"end": "close"}], True)])
    assert plain is not None and other is not None
    frames = b"".join(_FRAME.pack(len(data)) + data for data in (plain, other))
    subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path), "1", "1024"], input=frames,
                   check=True, timeout=60)
    lines = [json.loads(line) for line in (tmp_path / "a.milterlog").read_text().splitlines()]
    noted = {"stage": "rcpt", "args": ["<a@example.org>", ""], "macros": {"i": "Q1"},
             "answer": "CONTINUE", "ms": 2.0}
    assert lines == [{"x": 1}, noted, noted,
                     {"stage": "eom", "args": [], "answer": "CONTINUE", "ms": 1.0,
                      "actions": [["add_header", "X-Tag", "1"]]}, {"end": "close"}]
    assert (tmp_path / "b.milterlog").read_text() == '{"y":2}\n'


def test_each_kind_of_line_is_encoded_as_the_json_the_format_documents() -> None:
    """The writer's encoder takes shortcuts (bytes decoded inline, empty lists): each must
    still write what the format says."""
    cases = [
        (["mail", (b"<s\xff@x>", b"SIZE=1"), [b"{mail_addr}", b"s@x", b"i", b'Q"1', b"odd"], 0,
          0.0012, None],
         {"stage": "mail", "args": ["<s\udcff@x>", "SIZE=1"],
          "macros": {"{mail_addr}": "s@x", "i": 'Q"1'}, "answer": "CONTINUE", "ms": 1.2}),
        (["rcpt", (b"<r@x>", ""), [], int(Status.REJECT), 1.5,
          [["set_reply", b"550", None, [b"no \\ way", b"\xc3\xa9"]]]],
         {"stage": "rcpt", "args": ["<r@x>", ""], "macros": {}, "answer": "REJECT", "ms": 1500.0,
          "actions": [["set_reply", "550", None, ["no \\ way", "\u00e9"]]]}),
        (["header", (b"Subject", b"a\tb"), None, 0, 0.0, None],
         {"stage": "header", "args": ["Subject", "a\tb"], "answer": "CONTINUE", "ms": 0.0}),
        (["body", (7,), None, 0, 0.002, None],
         {"stage": "body", "size": 7, "args": [None], "answer": "CONTINUE", "ms": 2.0}),
        (["eom", (), None, None, None, [["change_header", b"X", 2, None]]],
         {"stage": "eom", "args": [], "actions": [["change_header", "X", 2, None]]}),
    ]
    for line, expected in cases:
        text = _encode(line, True)
        assert text.endswith("}\n") and text.isascii()
        assert json.loads(text) == expected
    assert json.loads(_encode(["body", (b"ab",), None, 0, 0.0, None], True))["args"] == ["ab"]
    assert json.loads(_encode(["body", (b"ab",), None, 0, 0.0, None], False))["args"] == [None]


class Unprintable:
    """An action's argument that cannot even be turned into text."""

    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_a_batch_that_cannot_be_handed_over_is_dropped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eom = ["eom", (), None, 0, 0.001, [["add_header", "X", Unprintable()]]]
    with caplog.at_level(logging.ERROR, "pymilterkit"):
        assert _pack([("a", [eom], True)]) is None
    assert [r.getMessage() for r in caplog.records] == [
        "record: could not hand over 1 part(s) of recordings"]
    assert _pack([("a", [{"x": 1}], True)]) is not None


def test_a_full_queue_drops_and_a_failing_disk_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    feed = Feed(RecordOptions(str(tmp_path)))
    feed.thread = object()  # type: ignore[assignment]  # no thread: the queue stays full
    for _ in range(_QUEUE):
        assert feed.put(("c", [], False))
    assert not feed.put(("c", [], False))
    assert feed.dropped == 1

    os.chmod(tmp_path, 0o500)
    try:
        writer = Writer(RecordOptions(str(tmp_path), max_mb=1))
        with caplog.at_level(logging.WARNING, "pymilterkit"):
            for name in "abc":
                writer.handle(name, [{"x": 1}], True)
            writer.close()
    finally:
        os.chmod(tmp_path, 0o700)
    if os.geteuid() != 0:
        assert [r.getMessage() for r in caplog.records if "record:" in r.getMessage()] == [
            f"record: cannot write {tmp_path}/a.milterlog: Permission denied; recording is "
            "skipped until it works again"]
        assert list(tmp_path.iterdir()) == []


def test_the_size_cap_starts_no_new_file(tmp_path: Path) -> None:
    (tmp_path / "old.milterlog").write_bytes(b"x" * (1 << 20))
    writer = Writer(RecordOptions(str(tmp_path), max_mb=1))
    writer.handle("new", [{"x": 1}], True)
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.milterlog"]


def test_a_file_another_writer_renames_meanwhile_does_not_stop_a_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers share the directory: while one writer adds up its files' sizes, another
    # renames its .part (seen in CI: a connection's recording was given up, ENOENT).
    (tmp_path / "other.milterlog.part").write_bytes(b"x")
    listed = os.scandir

    class Renamed:
        """os.scandir, whose .part files are renamed right after they were listed."""

        def __init__(self, path: str) -> None:
            with listed(path) as entries:
                self.entries = list(entries)

        def __enter__(self) -> list[os.DirEntry[str]]:
            for entry in self.entries:
                if entry.name.endswith(".part"):
                    os.rename(entry.path, entry.path.removesuffix(".part"))
            return self.entries

        def __exit__(self, *exc: object) -> None:
            pass

    writer = Writer(RecordOptions(str(tmp_path)))
    monkeypatch.setattr(os, "scandir", Renamed)
    writer.handle("new", [{"x": 1}], True)
    monkeypatch.undo()
    writer.close()
    assert not writer.failing
    assert (tmp_path / "new.milterlog").read_text() == '{"x":1}\n'


def test_the_size_cap_is_logged_once_until_a_new_file_is_written_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = Writer(RecordOptions(str(tmp_path), max_mb=0.001))  # 1048 bytes
    pad = ["eom", (), None, 0, 0.001, [["add_header", "X-Pad", "p" * 2000]]]
    with caplog.at_level(logging.INFO, "pymilterkit"):
        writer.handle("a", [{"x": 1}, pad], False)  # begun below the cap
        for number in range(3):  # new connections refused, while "a" goes on
            writer.handle(f"new{number}", [{"x": 1}], False)
            writer.handle("a", [pad], False)
        writer.handle("a", [], True)
        (tmp_path / "a.milterlog").unlink()
        writer.scanned = -math.inf  # the next new file looks at the directory again
        writer.handle("later", [{"x": 1}], True)
    assert [r.getMessage() for r in caplog.records] == [
        f"record: {tmp_path} holds 0.001 MiB of recordings (--record-max-mb); recording is "
        "skipped until it works again", "record: writing recordings again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.milterlog"]


class Named(MilterSession):
    pass


def test_recorders_of_one_process_never_give_two_connections_one_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name taken twice would make a second file overwrite the first at its rename.
    monkeypatch.setattr(time, "strftime", lambda _: "20261207T120000")  # all in one second
    names = set()
    for _ in range(2):
        recorder = Recorder(RecordOptions(str(tmp_path)), Named)
        for _ in range(2):
            session = cast(MilterSession, types.SimpleNamespace())
            recorder.backend(cast(SessionBackend, None), session)
            names.add(session._pmk_log.name)
    assert len(names) == 4
