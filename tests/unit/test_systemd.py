"""systemd integration in-process: the `systemd` socket spec, LISTEN_* checks, sd_notify messages.

The real thing (systemd-socket-activate starting `pymilterkit run`) is in
tests/integration/test_systemd.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymilterkit import SocketSpecError
from pymilterkit import _systemd as sd
from pymilterkit._socketspec import SocketSpec, parse_socket_spec


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("systemd", SocketSpec("systemd")),
        ("SYSTEMD", SocketSpec("systemd")),
        ("systemd:milter", SocketSpec("systemd", path="milter")),
    ],
)
def test_systemd_specs(text: str, spec: SocketSpec) -> None:
    assert parse_socket_spec(text) == spec
    assert str(parse_socket_spec(text)) == str(spec)


@pytest.mark.parametrize("text", ["systemd:", "systemd:a:b", "systemd:a b"])
def test_bad_systemd_specs_are_refused(text: str) -> None:
    with pytest.raises(SocketSpecError, match="FileDescriptorName"):
        parse_socket_spec(text)


def test_a_client_cannot_connect_to_a_systemd_spec() -> None:
    from pymilterkit.testing._client import parse_client_spec

    with pytest.raises(SocketSpecError, match="cannot connect to a systemd spec"):
        parse_client_spec("systemd")


# -- LISTEN_FDS / LISTEN_PID ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, r"no socket was passed \(LISTEN_FDS and LISTEN_PID not set\)"),
        ({"LISTEN_FDS": "1"}, r"\(LISTEN_PID not set\)"),
        ({"LISTEN_PID": "{pid}"}, r"\(LISTEN_FDS not set\)"),
        ({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, "LISTEN_PID=1 is not this process"),
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "is not a process id"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"}, "LISTEN_FDS='0': no socket"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1': no socket"),
    ],
)
def test_missing_or_foreign_sockets_are_refused(environ: dict[str, str], message: str) -> None:
    env = {k: v.format(pid=os.getpid()) for k, v in environ.items()}
    with pytest.raises(SocketSpecError, match=message) as info:
        sd.take_listener(SocketSpec("systemd"), env)
    assert "systemd-socket-activate" in str(info.value)  # says how to do it right
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(env)


def test_names_pair_with_descriptors_from_3() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert sd.passed_fds(env, os.getpid()) == [(3, "a"), (4, "b")]
    env["LISTEN_FDNAMES"] = "a"  # does not match the count: sd_listen_fds_with_names' default
    assert sd.passed_fds(env, os.getpid()) == [(3, "unknown"), (4, "unknown")]


@pytest.fixture
def passed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Descriptors to pass "from systemd": appended in order, numbered from a free high fd."""
    start = 200
    monkeypatch.setattr(sd, "LISTEN_FDS_START", start)
    fds: list[int] = []
    yield fds
    for i in range(len(fds)):
        with contextlib.suppress(OSError):
            os.close(start + i)


def _pass(fds: list[int], sock: socket.socket | int) -> int:
    target = sd.LISTEN_FDS_START + len(fds)
    os.dup2(sock if isinstance(sock, int) else sock.fileno(), target)
    fds.append(target)
    return target


def _env(fds: list[int], names: str | None = None) -> dict[str, str]:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(fds)), "OTHER": "kept"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def test_a_listening_tcp_socket_is_taken(passed: list[int]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        fd = _pass(passed, server)
    env = _env(passed, "milter")
    listener, spec = sd.take_listener(SocketSpec("systemd"), env)
    try:
        assert listener.fileno() == fd
        assert listener.file is None  # nothing to unlink at stop
        assert spec == SocketSpec("inet", port=port, host="127.0.0.1")
        assert listener.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert env == {"OTHER": "kept"}
        with socket.create_connection(("127.0.0.1", spec.port), timeout=5):
            pass
    finally:
        listener.sock.detach()


def test_a_unix_socket_keeps_its_path(passed: list[int], tmp_path: Path) -> None:
    path = str(tmp_path / "m.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        _pass(passed, server)
    listener, spec = sd.take_listener(SocketSpec("systemd"), _env(passed))
    assert spec == SocketSpec("unix", path=path)
    listener.close()
    assert os.path.exists(path), "a systemd socket file is not ours to remove"


def test_several_sockets_need_a_name(passed: list[int]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as a, socket.create_server(("127.0.0.1", 0)) as b:
        _pass(passed, a)
        second = _pass(passed, b)
        port_b = b.getsockname()[1]
    with pytest.raises(SocketSpecError, match=r"2 sockets: smtp \(fd 200\), submission \(fd 201\)"
                       r".*--socket systemd:NAME"):
        sd.take_listener(SocketSpec("systemd"), _env(passed, "smtp:submission"))
    with pytest.raises(SocketSpecError, match="no socket named 'other'"):
        sd.take_listener(SocketSpec("systemd", path="other"), _env(passed, "smtp:submission"))
    with pytest.raises(SocketSpecError, match="2 sockets named 'x'"):
        sd.take_listener(SocketSpec("systemd", path="x"), _env(passed, "x:x"))
    listener, spec = sd.take_listener(
        SocketSpec("systemd", path="submission"), _env(passed, "smtp:submission")
    )
    assert listener.fileno() == second and spec.port == port_b
    assert not os.get_inheritable(passed[0])  # the other one is not passed on
    listener.sock.detach()


def test_a_socket_that_cannot_serve_is_refused(passed: list[int]) -> None:
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0))  # bound but not listening
    _pass(passed, bound)
    bound.close()
    with pytest.raises(SocketSpecError, match=f"descriptor {passed[0]} is not listening"):
        sd.take_listener(SocketSpec("systemd"), _env(passed))
    os.fstat(passed[0])  # refused, but left open: it is systemd's

    passed.clear()
    os.close(sd.LISTEN_FDS_START)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        _pass(passed, datagram)
    with pytest.raises(SocketSpecError, match="SOCK_DGRAM socket; milters need a stream"):
        sd.take_listener(SocketSpec("systemd"), _env(passed))

    passed.clear()
    os.close(sd.LISTEN_FDS_START)
    read, write = os.pipe()
    _pass(passed, read)
    os.close(read)
    os.close(write)
    with pytest.raises(SocketSpecError, match="is not a socket"):
        sd.take_listener(SocketSpec("systemd"), _env(passed))

    passed.clear()
    os.close(sd.LISTEN_FDS_START)
    passed.append(sd.LISTEN_FDS_START)  # announced, never opened
    with pytest.raises(SocketSpecError, match="is not open"):
        sd.take_listener(SocketSpec("systemd"), _env(passed))


# -- sd_notify -----------------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        yield sock


def _messages(sock: socket.socket) -> list[dict[str, str]]:
    found = []
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096).decode()
            found.append(dict(line.split("=", 1) for line in data.split("\n")))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return found


def test_notify_environment_is_taken_and_unset(manager: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": manager.getsockname(), "WATCHDOG_USEC": "3000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    notifier = sd.Notifier.from_environ(env)
    assert env == {"OTHER": "kept"}
    assert notifier.enabled and notifier.watchdog_interval == 1.5
    notifier.close()
    other = sd.Notifier.from_environ(
        {"NOTIFY_SOCKET": manager.getsockname(), "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    )
    assert other.enabled and other.watchdog_interval == 0.0  # another process's watchdog
    assert not sd.Notifier.from_environ({}).enabled
    assert not sd.Notifier.from_environ({"NOTIFY_SOCKET": "relative"}).enabled


def test_ready_status_watchdog_stopping(manager: socket.socket) -> None:
    notifier = sd.Notifier(manager.getsockname(), watchdog_usec=1)
    try:
        notifier.tick("unix:/run/m.sock", open_=2, served=7)
        notifier.tick("unix:/run/m.sock", open_=2, served=7)  # watchdog due again, status same
        notifier.reloading()
        notifier.ready()
        notifier.tick("unix:/run/m.sock", stopping=True)
        notifier.stopping()  # once only
        got = _messages(manager)
    finally:
        notifier.close()
    assert got[0] == {
        "READY": "1",
        "STATUS": "serving on unix:/run/m.sock; 2 session(s) open, 7 served",
        "WATCHDOG": "1",
    }
    assert got[1] == {"WATCHDOG": "1"}
    assert got[2]["RELOADING"] == "1" and int(got[2]["MONOTONIC_USEC"]) > 0
    assert got[3]["READY"] == "1"
    assert got[4] == {"STOPPING": "1", "STATUS": "stopping"}
    assert len(got) == 5 or "STOPPING" not in got[5]


def test_an_abstract_notify_socket(manager: socket.socket) -> None:
    name = f"pymilterkit-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        abstract.settimeout(5)
        notifier = sd.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        try:
            notifier.tick("inet:3000@127.0.0.1")
            assert abstract.recv(4096).startswith(b"READY=1\nSTATUS=serving on inet:3000")
        finally:
            notifier.close()


def test_a_supervisor_reports_its_workers_sessions(manager: socket.socket) -> None:
    notifier = sd.Notifier(manager.getsockname())
    notifier.for_workers(3)
    try:
        notifier.tick("unix:/m", workers=[0, 1, 2])  # no worker serves yet: not ready
        board = notifier._board
        assert board is not None
        sd.write(board, 0, 1, 10)
        sd.write(board, 2, 3, 5)
        notifier.tick("unix:/m", workers=[0, 1, 2])
        sd.write(board, 1, 4, 4)
        sd.write(board, 10**6, 100, 100)  # beyond the board: not counted, no failure
        notifier._next_status = 0.0
        notifier.tick("unix:/m", workers=[1, 2, 10**6])  # worker 0 has gone
        got = _messages(manager)
    finally:
        notifier.close()
    assert "READY" not in got[0]
    assert got[1] == {
        "READY": "1",
        "STATUS": "serving on unix:/m, 3 worker(s) alive (2 serving); 4 session(s) open, 15 served",
    }
    assert got[2]["STATUS"].endswith("3 worker(s) alive (2 serving); 7 session(s) open, 9 served")


def test_no_notify_socket_means_no_messages(manager: socket.socket) -> None:
    notifier = sd.Notifier(None, watchdog_usec=1)
    notifier.tick("unix:/m")
    notifier.stopping()
    assert not notifier.send("READY=1")
    assert _messages(manager) == []
