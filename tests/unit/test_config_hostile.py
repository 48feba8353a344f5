"""Hostile or broken config files: one line and exit 2, before anything is opened."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pymilterkit.__main__ import main


def _refused(path: Path | str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> str:
    start = time.monotonic()
    code = main(["run", "--config", str(path), "--socket", f"unix:{tmp_path}/m.sock"])
    assert time.monotonic() - start < 5  # no hang, no read without bound
    _, err = capsys.readouterr()
    assert code == 2
    (line,) = err.splitlines()
    assert len(line) < 400
    assert not (tmp_path / "m.sock").exists()
    return line


def test_a_device_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "/dev/zero is not a regular file" in _refused("/dev/zero", capsys, tmp_path)
    link = tmp_path / "zero.toml"
    link.symlink_to("/dev/zero")
    assert "is not a regular file" in _refused(link, capsys, tmp_path)


def test_a_fifo_is_refused_without_waiting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert "is not a regular file" in _refused(fifo, capsys, tmp_path)


def test_a_huge_file_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (2 * 1024 * 1024) + "\n")
    assert "larger than 1024 KiB" in _refused(big, capsys, tmp_path)


def test_bytes_that_are_not_utf8(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'name = "caf\xe9"\n')
    assert "not UTF-8 (byte 11" in _refused(bad, capsys, tmp_path)


def test_deep_nesting(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    line = _refused(deep, capsys, tmp_path)
    assert "nested too deeply" in line or "not valid TOML" in line


def test_a_long_error_is_cut(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    long = tmp_path / "long.toml"
    long.write_text("k" * 5000 + " = = 1\n")
    assert "pymilterkit: error:" in _refused(long, capsys, tmp_path)


def test_a_directory_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert f"config file {tmp_path} is not a regular file" in _refused(tmp_path, capsys, tmp_path)
