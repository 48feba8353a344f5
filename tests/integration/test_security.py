"""Security defaults: socket permissions, dropping privileges, no injection, escaped logs."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymilterkit import MilterError, Status
from pymilterkit.testing import HeaderAdded, MilterClient, MilterProcess
from tests.helpers import worker_pids

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
COUNTER = "examples.rcpt_count:RcptCount"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop privileges)")


def count_ok(milter: MilterProcess) -> None:
    result = MilterClient(milter.socket, timeout=10).run(
        b"Subject: s\r\n\r\nbody\r\n", recipients=["a@example.com", "b@example.com"])
    assert result.header("X-Rcpt-Count") == "2"


def proc_status(pid: int, field: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.parametrize("workers", [1, 2])
def test_unix_socket_is_owner_and_group_only_by_default(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "m.sock"
    old = os.umask(0)  # even with a permissive umask (the child inherits it)
    try:
        with MilterProcess(COUNTER, f"unix:{path}", args=["--workers", str(workers)],
                           cwd=ROOT) as milter:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            count_ok(milter)
    finally:
        os.umask(old)


def test_socket_mode_and_group_options(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    group = grp.getgrgid(os.getgid()).gr_name
    with MilterProcess(COUNTER, f"unix:{path}", cwd=ROOT,
                       args=["--socket-mode", "600", "--socket-group", group]) as milter:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_gid == os.getgid()
        count_ok(milter)


@root_only
@pytest.mark.parametrize("workers", [1, 2])
def test_drop_privileges_to_nobody(workers: int) -> None:
    nobody = pwd.getpwnam("nobody")
    with MilterProcess(COUNTER, cwd=ROOT, args=["--user", "nobody", "--socket-group", "nogroup",
                                                "--workers", str(workers)]) as milter:
        st = os.stat(milter.spec.path)
        # Owned by the user it runs as, so it can reach its own socket (the stop's wake-up).
        assert st.st_uid == nobody.pw_uid and st.st_gid == grp.getgrnam("nogroup").gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660
        # The process that serves (the workers, with --workers) runs as nobody, for good.
        servers = worker_pids(milter.pid, workers) if workers > 1 else [milter.pid]
        assert len(servers) == workers
        for pid in servers:
            assert proc_status(pid, "Uid") == [str(nobody.pw_uid)] * 4
            assert proc_status(pid, "Gid") == [str(nobody.pw_gid)] * 4
            assert proc_status(pid, "Groups") == []
        for _ in range(4):
            count_ok(milter)
        assert milter.stop() == 0, milter.log()
        assert "Traceback" not in milter.log()


@root_only
def test_what_a_reload_cannot_read_as_the_user_is_said_at_start(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # root's only: nobody cannot read the config a reload reads
    config = private / "m.toml"
    config.write_text('target = "examples.rcpt_count:RcptCount"\n')
    config.chmod(0o644)
    with MilterProcess(COUNTER, cwd=ROOT,
                       args=["--config", str(config), "--user", "nobody"]) as milter:
        count_ok(milter)
        log = milter.log()
    (line,) = [ln for ln in log.splitlines() if "user nobody cannot read" in ln]
    assert str(config) in line and "WARNING" in line and "a reload" in line
    # Readable to nobody: not named.
    open_dir = Path(tempfile.mkdtemp(prefix="pmk-open-"))
    try:
        open_dir.chmod(0o755)
        readable = open_dir / "m.toml"
        readable.write_text('target = "examples.rcpt_count:RcptCount"\n')
        readable.chmod(0o644)
        with MilterProcess(COUNTER, cwd=ROOT,
                           args=["--config", str(readable), "--user", "nobody"]) as milter:
            count_ok(milter)
            log = milter.log()
    finally:
        shutil.rmtree(open_dir)
    assert str(readable) not in log  # (a private interpreter, as under /root, still is)


@root_only
def test_a_socket_the_user_cannot_remove_is_logged_at_stop() -> None:
    directory = Path(tempfile.mkdtemp(prefix="pmk-rootdir-"))
    try:
        directory.chmod(0o755)  # root's: nobody may not remove entries here
        path = directory / "m.sock"
        with MilterProcess(COUNTER, f"unix:{path}", cwd=ROOT,
                           args=["--user", "nobody"]) as milter:
            count_ok(milter)
            assert milter.stop() == 0, milter.log()
            log = milter.log()
        assert path.exists()
        assert f"socket file {path} left in place: Permission denied" in log, log
    finally:
        shutil.rmtree(directory)


@root_only
@pytest.mark.parametrize("workers", [1, 2])
def test_stop_with_a_socket_group_the_user_is_not_in(workers: int) -> None:
    """--user nobody --socket-group daemon: the stop's wake-up still reaches the socket (it
    used to get EACCES and wait out libmilter's 5 s poll)."""
    assert "nobody" not in grp.getgrnam("daemon").gr_mem
    with MilterProcess(COUNTER, cwd=ROOT, args=["--user", "nobody", "--socket-group", "daemon",
                                                "--workers", str(workers)]) as milter:
        st = os.stat(milter.spec.path)
        assert st.st_uid == pwd.getpwnam("nobody").pw_uid
        assert st.st_gid == grp.getgrnam("daemon").gr_gid
        count_ok(milter)
        assert milter.stop() == 0, milter.log()
        assert "Traceback" not in milter.log()


def test_dropping_privileges_without_root_is_refused(tmp_path: Path) -> None:
    from pymilterkit import ConfigurationError
    from pymilterkit._security import drop_privileges

    if os.geteuid() != 0:
        with pytest.raises(ConfigurationError, match="needs to start as root"):
            drop_privileges("nobody", None)
        return
    # As root (CI): act as an unprivileged user for a moment; the real uid stays 0, so the
    # effective uid can be given back afterwards.
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        with pytest.raises(ConfigurationError, match="needs to start as root"):
            drop_privileges("nobody", None)
    finally:
        os.seteuid(0)
    assert os.geteuid() == 0


# -- injection ---------------------------------------------------------------------------

# (NUL cannot even travel in the protocol's strings; the property tests cover it.)
INJECTIONS = [b"\r\nBcc: evil@example.net", b"\nX-Evil: 1", b"\rX", b"\r\n.\r\nMAIL FROM:<x>"]


@pytest.fixture(scope="module")
def echo() -> Iterator[MilterProcess]:
    with MilterProcess("tests.reliability.filters:Echo", cwd=ROOT) as milter:
        yield milter
        assert milter.stop() == 0
        assert "InvalidArgumentError" in milter.log()  # the refusals were logged


@pytest.mark.parametrize("api", ["hdr", "from", "rcpt", "par", "quar"])
@pytest.mark.parametrize("evil", INJECTIONS)
def test_untrusted_input_cannot_inject_protocol_lines(echo: MilterProcess, api: str,
                                                      evil: bytes) -> None:
    conn = MilterClient(echo.socket, timeout=10).open()
    conn.negotiate()
    conn.mail(f"<{api}@example.net>")
    conn.rcpt(b"<victim" + evil + b"@example.com>")
    conn.data()
    conn.header("X-Echo", b"value" + evil)
    conn.eoh()
    eom = conn.eom()
    conn.quit()
    # The library refused the value: the filter's exception is answered with the error
    # status, and nothing at all was sent to the MTA.
    assert eom.status is Status.TEMPFAIL and eom.modifications == ()


def test_clean_input_goes_through_the_same_apis(echo: MilterProcess) -> None:
    conn = MilterClient(echo.socket, timeout=10).open()
    conn.negotiate()
    conn.mail("<hdr@example.net>")
    conn.rcpt("<victim@example.com>")
    conn.header("X-Echo", "folded\n\tvalue")
    eom = conn.eom()
    conn.quit()
    assert eom.status is Status.CONTINUE
    assert eom.modifications == (HeaderAdded("X-Echo", "folded\n\tvalue"),)


@pytest.mark.parametrize("evil", INJECTIONS)
def test_untrusted_input_cannot_inject_reply_lines(echo: MilterProcess, evil: bytes) -> None:
    conn = MilterClient(echo.socket, timeout=10).open()
    conn.negotiate()
    conn.mail("<hdr@example.net>")
    clean = conn.rcpt("<reply@example.com>")
    hostile = conn.rcpt(b"<reply" + evil + b"@example.com>")
    conn.quit()
    assert clean is not None and clean.status is Status.REJECT and clean.reply is not None
    assert clean.reply.lines == ("no such user <reply@example.com>",)
    # set_reply refused the text: the error status, and no line of the attacker's.
    assert hostile is not None and hostile.status is Status.TEMPFAIL
    assert hostile.reply is None


# -- log escaping ------------------------------------------------------------------------


def test_log_lines_escape_control_characters_from_untrusted_input() -> None:
    evil = b"<boom\r\nINFO forged line\x1b[31m\xff@example.com>"
    with MilterProcess("tests.reliability.filters:RaisesWithRecipient", cwd=ROOT) as milter:
        conn = MilterClient(milter.socket, timeout=10).open()
        conn.negotiate()
        conn.mail("<a@example.net>")
        answer = conn.rcpt(evil)
        conn.quit()
        assert answer is not None and answer.status is Status.TEMPFAIL
        assert milter.stop() == 0
        raw = milter.log_path.read_bytes()
        text = milter.log()
    assert b"\x1b" not in raw and b"\r" not in raw
    assert raw.decode("utf-8") == text  # valid UTF-8: the undecodable byte was escaped too
    assert "ValueError: bad recipient <boom\\r\\nINFO forged line\\x1b[31m\\xff@example.com>" \
        in text, text
    assert not any(line.startswith("INFO forged") for line in text.splitlines())
    assert "Logging error" not in text


@root_only
def test_a_spool_dir_the_user_cannot_write_stops_the_start(tmp_path: Path) -> None:
    # Checked as root when the options are read, it passed; as nobody, every message past
    # the spool threshold would fail.
    spool = Path(tempfile.mkdtemp(prefix="pmk-spool-"))
    try:
        spool.chmod(0o755)  # root's: nobody cannot make files here
        path = tmp_path / "m.sock"
        milter = MilterProcess("examples.attachments:Attachments", f"unix:{path}", cwd=ROOT,
                               args=["--user", "nobody", "--spool-dir", str(spool)])
        with pytest.raises(MilterError, match="exited with 2 during start") as failed:
            milter.start()
        assert f"user nobody cannot make a temporary file in {spool}" in str(failed.value)
        # Writable to nobody (the default, TMPDIR): it starts and serves.
        with MilterProcess("examples.attachments:Attachments", f"unix:{path}", cwd=ROOT,
                           args=["--user", "nobody"]) as started:
            result = MilterClient(started.socket, timeout=10).run(
                b"Subject: s\r\n\r\nbody\r\n", recipients=["a@example.com"])
            assert result.status in (Status.CONTINUE, Status.ACCEPT) and result.delivered
    finally:
        shutil.rmtree(spool)
