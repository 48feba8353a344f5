"""The unix socket's mode and group are set without going through a path anybody can swap.

The socket's directory belongs to an unprivileged user (the documented setup gives the milter's
user such a directory), who races every start with `socket_attacker.py`: whatever root creates
there is swapped for a symlink to a root-only file. The file must stay root-only every time.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the race is root's: the test needs root"),
]

ROOT = Path(__file__).resolve().parents[2]
ATTACKER = Path(__file__).with_name("socket_attacker.py")
COUNTER = "examples.rcpt_count:RcptCount"


class Arena:
    """A socket directory owned by `nobody`, a root-only victim file, and the attacker."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.dir = base / "run"
        self.dir.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
        self.victim = base / "secret"
        self.victim.write_text("root only\n")
        os.chmod(self.victim, 0o600)
        self.stop_file = base / "stop"
        self.attacker: subprocess.Popen[str] | None = None
        self.said = ""  # what the attacker printed after "ready", read so far

    @property
    def socket(self) -> Path:
        return self.dir / "m.sock"

    def start_attacker(self, seconds: float) -> None:
        self.stop_file.unlink(missing_ok=True)  # (a second attack after one stopped)
        self.said = ""
        self.attacker = subprocess.Popen(
            [sys.executable, str(ATTACKER), str(self.dir), str(self.victim), str(seconds),
             str(self.stop_file)],
            stdout=subprocess.PIPE, text=True,
        )
        # Its interpreter's start and the drop to nobody take a while (longer on newer
        # Pythons): the race begins once it says so, not before.
        assert self.attacker.stdout is not None
        assert self.attacker.stdout.readline().strip() == "ready"

    def swaps_so_far(self) -> int:
        """The attacker's count at its last progress line (printed at every 25th swap)."""
        assert self.attacker is not None and self.attacker.stdout is not None
        fd = self.attacker.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 4096)
            if not data:
                break
            self.said += data.decode()
        words = self.said.split()
        return int(words[-1]) if words else 0

    def stop_attacker(self) -> int:
        assert self.attacker is not None
        self.stop_file.touch()
        out, _ = self.attacker.communicate(timeout=30)
        words = (self.said + out).split()
        return int(words[-1]) if words else 0

    def victim_changed(self) -> bool:
        st = os.lstat(self.victim)
        return stat.S_IMODE(st.st_mode) != 0o600 or st.st_gid != 0 or st.st_uid != 0

    def clear(self) -> None:
        """Remove what the last start (and the attacker) left in the directory."""
        for entry in list(self.dir.iterdir()):
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


@pytest.fixture
def arena() -> Iterator[Arena]:
    base = Path(tempfile.mkdtemp(prefix="pmk-race-"))
    os.chmod(base, 0o755)  # nobody must reach run/ (and not the victim, which is 0600)
    a = Arena(base)
    try:
        yield a
    finally:
        if a.attacker is not None and a.attacker.poll() is None:
            a.attacker.kill()
            a.attacker.wait()
        shutil.rmtree(base, ignore_errors=True)


# The start's socket code in a loop, in one root process: each round clears the directory,
# opens the listener as `pymilterkit run` does (mode 0660, group daemon) and checks the victim.
_LOOP = r"""
import json, os, shutil, stat, sys
from pymilterkit._errors import MilterError
from pymilterkit._listen import open_listener
from pymilterkit._socketspec import parse_socket_spec
directory, victim, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = parse_socket_spec(os.path.join(directory, "m.sock"))
opened = refused = changed = 0
for _ in range(rounds):
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            pass
    try:
        sock = open_listener(spec, mode=0o660, group="daemon")
    except MilterError:
        refused += 1
    else:
        opened += 1
        sock.close()
    st = os.lstat(victim)
    if stat.S_IMODE(st.st_mode) != 0o600 or st.st_gid != 0:
        changed += 1
        os.chmod(victim, 0o600)
        os.chown(victim, 0, 0)
print(json.dumps({"opened": opened, "refused": refused, "changed": changed}))
"""


def test_listener_start_loop_never_touches_a_swapped_path(arena: Arena) -> None:
    batch, rounds, wanted = 500, 0, 125
    arena.start_attacker(seconds=170)
    counts = {"opened": 0, "refused": 0, "changed": 0}
    # Batches until the attacker has really raced (a busy machine gives it less of the CPU).
    while rounds < 8 * batch and (rounds == 0 or arena.swaps_so_far() < wanted):
        out = subprocess.run(
            [sys.executable, "-c", _LOOP, str(arena.dir), str(arena.victim), str(batch)],
            capture_output=True, text=True, timeout=180, cwd=ROOT, check=True,
        ).stdout
        rounds += batch
        for key, value in json.loads(out).items():
            counts[key] += value
    swaps = arena.stop_attacker()
    assert counts["opened"] + counts["refused"] == rounds
    assert counts["changed"] == 0, counts
    assert not arena.victim_changed()
    # The race was really run: the attacker swapped a socket in many rounds.
    assert swaps >= wanted, (swaps, rounds, counts)


def _start_and_stop(arena: Arena, args: list[str]) -> str:
    """One `pymilterkit run`: wait until it logged its socket as ready, then kill it.

    SIGKILL, not SIGTERM: the attacker has swapped the socket for a link by then, so the stop's
    wake-up connection cannot reach it and a SIGTERM stop would wait out libmilter's 5 s poll.
    The race is at the start; the stop's removal is tested on its own below.
    """
    ready = ("listening on", "workers on")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pymilterkit", "--log-level", "INFO", "run", COUNTER,
             "--socket", f"unix:{arena.socket}", "--socket-mode", "660",
             "--socket-group", "daemon", *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                log.seek(0)
                if any(word in log.read() for word in ready):
                    break
                time.sleep(0.02)
        finally:
            proc.kill()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        return log.read()


@pytest.mark.parametrize("args", [[], ["--workers", "2"], ["--user", "nobody"]],
                         ids=["single", "workers2", "user-nobody"])
def test_whole_starts_under_attack_never_open_the_victim(arena: Arena, args: list[str]) -> None:
    starts = 10
    grp.getgrnam("daemon")  # the group the probe used
    changed = swaps = 0
    logs = []
    # Rounds of starts until the attacker has swapped at least once (a busy machine may
    # give it no swap in ten starts), at most three.
    for _ in range(3):
        arena.start_attacker(seconds=180)
        for _ in range(starts):
            arena.clear()
            logs.append(_start_and_stop(arena, args))
            if arena.victim_changed():
                changed += 1
                os.chmod(arena.victim, 0o600)
                os.chown(arena.victim, 0, 0)
        swaps += arena.stop_attacker()
        if swaps:
            break
    assert changed == 0, logs[-1]
    assert swaps >= 1, logs[-1]
    # Every start got as far as serving: the attack was raced, not merely refused.
    assert all("listening on" in log or "workers on" in log for log in logs), logs


def test_stop_removes_only_its_own_socket(arena: Arena) -> None:
    """The socket was swapped for a link while serving: the stop leaves the link (and the
    victim) alone; unswapped, the stop removes the socket."""
    from pymilterkit._listen import open_listener
    from pymilterkit._socketspec import parse_socket_spec

    spec = parse_socket_spec(f"unix:{arena.socket}")
    listener = open_listener(spec, mode=0o660, group="daemon")
    st = os.lstat(arena.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("daemon").gr_gid
    os.rename(arena.socket, arena.dir / "elsewhere")
    os.symlink(arena.victim, arena.socket)
    listener.close()
    assert os.path.islink(arena.socket) and (arena.dir / "elsewhere").exists()
    assert arena.victim.exists() and not arena.victim_changed()
    arena.clear()
    listener = open_listener(spec)
    assert stat.S_IMODE(os.lstat(arena.socket).st_mode) == 0o660
    listener.close()
    assert not os.path.lexists(arena.socket)
    assert list(arena.dir.iterdir()) == []  # no private directory left behind
