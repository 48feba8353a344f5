"""Socket activation and sd_notify with the real tools: Debian's `systemd-socket-activate`
(package `systemd`) opens the socket and execs `pymilterkit run ... --socket systemd` when the
first client connects, as a `.socket` unit would; a datagram socket here stands in for
systemd's NOTIFY_SOCKET. The shipped units are checked with `systemd-analyze verify`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pymilterkit.testing import MilterClient
from tests.helpers import worker_pids

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

TARGET = "tests.integration.systemd_filters:EnvReport"
MESSAGE = b"Subject: activated\r\n\r\nbody\r\n"


def _tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/bin/{name}", f"/lib/systemd/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} not found: install Debian's systemd package (.ci/bootstrap.sh does)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Manager:
    """The NOTIFY_SOCKET end: collects what the milter tells systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        """Receive messages until `done()` (bounded)."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"systemd was not told {what}: {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.split("\n")))

    def wait_for(self, *keys: str, watchdogs: int = 0) -> None:
        """Until every key was seen, and `watchdogs` WATCHDOG=1 pings."""
        def seen() -> bool:
            pings = sum("WATCHDOG" in m for m in self.messages)
            return set(keys) <= {k for m in self.messages for k in m} and pings >= watchdogs

        self.wait_until(seen, f"{keys} and {watchdogs} pings")

    def values(self, key: str) -> list[str]:
        return [m[key] for m in self.messages if key in m]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    found = Manager(tmp_path / "notify")
    yield found
    found.close()


class Activated:
    """`systemd-socket-activate -l ADDRESS ... pymilterkit run TARGET --socket systemd`."""

    def __init__(self, address: str, log: Path, *args: str, env: dict[str, str]) -> None:
        setenv = [f"--setenv={k}={v}" for k, v in env.items()]
        if "PYTHONPATH" in os.environ:
            setenv.append(f"--setenv=PYTHONPATH={os.environ['PYTHONPATH']}")
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [_tool("systemd-socket-activate"), "-l", address, *setenv,
                 sys.executable, "-m", "pymilterkit", "--log-level", "DEBUG", "run", TARGET,
                 "--socket", "systemd", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_listening(self) -> None:
        """Until systemd-socket-activate listens (it execs the milter at the first client)."""
        deadline = time.monotonic() + 15
        while "Listening on" not in self.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM (the same PID: systemd-socket-activate exec'd the milter) and wait."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def _answers(spec: str, count: int) -> list[str | None]:
    pids = []
    for _ in range(count):
        result = MilterClient(spec, timeout=30).run(MESSAGE, recipients=["a@x", "b@x"])
        assert result.header("X-Rcpt-Count") == "2"
        assert result.header("X-Systemd-Env") == "none"  # the variables were unset
        pids.append(result.header("X-Pid"))
    return pids


def test_unix_socket_activation_and_notify(tmp_path: Path, manager: Manager) -> None:
    path = tmp_path / "m.sock"
    milter = Activated(str(path), tmp_path / "log", env={
        "NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "400000",
    })
    try:
        milter.wait_listening()
        pids = _answers(f"unix:{path}", 3)
        assert set(pids) == {str(milter.process.pid)}  # exec'd in place: LISTEN_PID matched
        manager.wait_for("READY", watchdogs=3)
        assert manager.messages[0]["READY"] == "1"
        wanted = f"serving on unix:{path}; 0 session(s) open, 3 served"
        manager.wait_until(lambda: wanted in manager.values("STATUS"), f"STATUS={wanted}")
        assert milter.stop() == 0, milter.log()
        manager.wait_for("STOPPING")
    finally:
        milter.close()
    log = milter.log()
    assert f"socket from systemd: fd 3, unix:{path}" in log
    assert "Traceback" not in log
    assert path.is_socket(), "the socket is systemd's: the milter must not unlink it"


def test_tcp_socket_activation_with_workers(tmp_path: Path, manager: Manager) -> None:
    port = _free_port()
    milter = Activated(f"127.0.0.1:{port}", tmp_path / "log", "--workers", "2", env={
        "NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "400000",
    })
    try:
        milter.wait_listening()
        pids = _answers(f"inet:{port}@127.0.0.1", 4)
        workers = worker_pids(milter.process.pid, 2)
        assert set(pids) <= {str(pid) for pid in workers}
        # Only the supervisor talks to systemd (NotifyAccess=main); it sums its workers.
        manager.wait_for("READY", watchdogs=3)
        wanted = (
            f"serving on inet:{port}@127.0.0.1, 2 worker(s) alive (2 serving); "
            f"0 session(s) open, 4 served"
        )
        manager.wait_until(lambda: wanted in manager.values("STATUS"), f"STATUS={wanted}")
        assert milter.stop() == 0, milter.log()
        manager.wait_for("STOPPING")
    finally:
        milter.close()
    assert "2 workers on inet:" in milter.log()
    assert "Traceback" not in milter.log()


def _run_refused(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    return subprocess.run(
        [sys.executable, "-m", "pymilterkit", "run", TARGET, "--socket", "systemd", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**clean, **env},
    )


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, (), "no socket was passed (LISTEN_FDS and LISTEN_PID not set)"),
        ({}, ("--workers", "2"), "no socket was passed (LISTEN_FDS and LISTEN_PID not set)"),
        ({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, (), "LISTEN_PID=1 is not this process"),
    ],
)
def test_no_socket_for_this_process_is_refused(
    env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    result = _run_refused(env, *args)
    assert result.returncode == 2, result.stderr
    assert f"pymilterkit: error: --socket systemd: {message}" in result.stderr
    assert "listening" not in result.stderr and "workers on" not in result.stderr
    assert "Traceback" not in result.stderr


# -- the shipped units ------------------------------------------------------------------------

UNITS = ROOT / "deploy" / "systemd"
SHIPPED_BINARY = "/opt/pymilterkit/bin/pymilterkit"


def _unit(path: Path) -> dict[str, list[str]]:
    """`Key` -> values of a unit file (continuation lines joined, comments left out)."""
    found: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(" ".join(value.split()))
    return found


def _installed_units(tmp_path: Path) -> Path:
    """The shipped units in a unit directory of their own, ExecStart pointing at this
    environment's `pymilterkit` (systemd-analyze checks that the command exists)."""
    binary = Path(sys.executable).parent / "pymilterkit"
    assert binary.exists(), f"no pymilterkit console script next to {sys.executable}"
    units = tmp_path / "units"
    units.mkdir()
    for name in ("pymilterkit@.service", "pymilterkit@.socket"):
        text = (UNITS / name).read_text()
        (units / name).write_text(text.replace(SHIPPED_BINARY, str(binary)))
    return units


def _verify(units: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("systemd-analyze"), "verify", "--man=no", *(str(units / n) for n in names)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_PAGER": "", "LC_ALL": "C"},
    )


def test_shipped_units_verify(tmp_path: Path) -> None:
    units = _installed_units(tmp_path)
    for instance in ("rcpt", "routing"):
        for kind in ("service", "socket"):
            os.symlink(units / f"pymilterkit@.{kind}", units / f"pymilterkit@{instance}.{kind}")
        result = _verify(units, f"pymilterkit@{instance}.socket", f"pymilterkit@{instance}.service")
        # Warnings (an unknown key, a bad value) do not change the exit status: none may appear.
        ours = [ln for ln in (result.stdout + result.stderr).splitlines() if "pymilterkit" in ln]
        assert result.returncode == 0 and not ours, result.stdout + result.stderr
    # The check is real: one misspelt key and one bad value in a copy are reported.
    broken = units / "pymilterkit@.service"
    broken.write_text(
        broken.read_text().replace("LimitNOFILE=", "LimitNOFILES=").replace(
            "Type=notify", "Type=notifyy")
    )
    result = _verify(units, "pymilterkit@rcpt.service")
    assert "Unknown key 'LimitNOFILES'" in result.stderr
    # (systemd 252, Debian 12: "Failed to parse service type"; 257, Debian 13: "Failed to
    # parse Type=notifyy")
    assert "Failed to parse service type" in result.stderr or (
        "Failed to parse Type=notifyy" in result.stderr
    ), result.stderr


def test_shipped_units_say_what_the_guide_says() -> None:
    service = _unit(UNITS / "pymilterkit@.service")
    socket_unit = _unit(UNITS / "pymilterkit@.socket")
    assert service["Type"] == ["notify"]
    (exec_start,) = service["ExecStart"]
    assert exec_start.startswith(
        f"{SHIPPED_BINARY} run --config /etc/pymilterkit/%i.toml --socket systemd"
    )
    assert service["ExecReload"] == ["kill -HUP $MAINPID"]
    assert service["EnvironmentFile"] == ["-/etc/pymilterkit/%i.env"]
    assert int(service["TimeoutStopSec"][0]) > 30  # longer than the default drain timeout
    assert service["LimitNOFILE"] == ["65536"]
    assert service["RestartPreventExitStatus"] == ["2"]
    for hardening in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[hardening] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert "RuntimeDirectory" not in service  # it would remove the socket's directory at stop
    assert socket_unit["ListenStream"] == ["/run/pymilterkit/%i.sock"]
    assert socket_unit["SocketMode"] == ["0660"]


def test_the_units_command_serves_on_the_units_socket(tmp_path: Path, manager: Manager) -> None:
    """The service's ExecStart, with a config file, on the socket unit's ListenStream (moved to
    a temporary directory), started as systemd would start it."""
    (exec_start,) = _unit(UNITS / "pymilterkit@.service")["ExecStart"]
    (listen,) = _unit(UNITS / "pymilterkit@.socket")["ListenStream"]
    path = tmp_path / Path(listen.replace("%i", "rcpt")).name
    config = tmp_path / "rcpt.toml"
    config.write_text(f'target = "{TARGET}"\nsocket = "unix:/ignored/by/--socket.sock"\n')
    argv = exec_start.replace("%i", "rcpt").replace("$PYMILTERKIT_ARGS", "").split()
    assert argv[:2] == [SHIPPED_BINARY, "run"]
    argv = [sys.executable, "-m", "pymilterkit", *argv[1:]]
    argv[argv.index("/etc/pymilterkit/rcpt.toml")] = str(config)
    setenv = [f"--setenv=NOTIFY_SOCKET={manager.path}"]
    if "PYTHONPATH" in os.environ:
        setenv.append(f"--setenv=PYTHONPATH={os.environ['PYTHONPATH']}")
    log = tmp_path / "log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [_tool("systemd-socket-activate"), "-l", str(path), *setenv, *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 15
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        _answers(f"unix:{path}", 1)
        manager.wait_for("READY")
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(20) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


@pytest.mark.parametrize("name", ["pymilterkit@.service", "pymilterkit@.socket"])
def test_the_deployment_guide_shows_the_shipped_units(name: str, tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "guides" / "deployment.md").read_text()
    start = guide.index(f"```ini\n# /etc/systemd/system/{name}\n") + len("```ini\n")
    shown = tmp_path / name
    shown.write_text(guide[start:guide.index("```", start)])
    assert _unit(shown) == _unit(UNITS / name)
