"""The runner as a process: start, signals, sockets, refusals. No MTA traffic needed."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymilterkit._affinity import confined_elsewhere
from pymilterkit._affinity import parse as parse_cpu_list
from pymilterkit.testing import MilterClient, MilterProcess
from tests.helpers import children, worker_pids

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_end_the_run_cleanly(signum: int) -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        milter.signal(signum)
        assert milter.wait(15) == 0, milter.log()
        log = milter.log()
    assert "Traceback" not in log
    # Python's handler logs the signal and stops at once. libmilter's own sigwait thread waits
    # for the same three signals, and now and then (seen under CPU load) the kernel hands it
    # the signal instead: libmilter then stops the run itself, at its next 5 s listener poll.
    # Either way the run must end cleanly, with every session closed from the Python side.
    assert "stopped: " in log
    assert not os.path.exists(milter.spec.path), "socket file left behind"


def test_a_second_run_in_one_process_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    result = python(
        f"""
import threading, time
from pymilterkit import Milter, MilterError, shutdown
from examples.rcpt_count import RcptCount
threading.Timer(0.5, shutdown).start()
Milter(RcptCount, "unix:{sock}").run()
try:
    Milter(RcptCount, "unix:{sock}").run()
except MilterError as exc:
    print("refused:", exc)
"""
    )
    assert result.returncode == 0, result.stderr
    assert "refused: libmilter allows one milter run per process" in result.stdout


def test_missing_libmilter_names_every_path_and_the_package() -> None:
    result = python(
        """
import pymilterkit, sys
assert "pymilterkit._libmilter" not in sys.modules or True
from pymilterkit import Milter, LibraryNotFoundError, MilterError
from examples.rcpt_count import RcptCount
try:
    Milter(RcptCount, "unix:/tmp/unused-pmk.sock").run()
except LibraryNotFoundError as exc:
    assert isinstance(exc, MilterError)
    print(exc)
""",
        PYMILTERKIT_LIBMILTER="/nonexistent/libmilter.so.1.0.1",
    )
    assert result.returncode == 0, result.stderr
    assert "/nonexistent/libmilter.so.1.0.1" in result.stdout
    assert "apt-get install libmilter1.0.1" in result.stdout


def test_import_does_not_load_libmilter() -> None:
    result = python(
        """
import sys, pymilterkit, pymilterkit.testing
maps = open("/proc/self/maps").read()
print("loaded" if "libmilter" in maps else "not loaded")
"""
    )
    assert result.stdout.strip() == "not loaded", result.stderr


def test_stale_unix_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    with MilterProcess("examples.rcpt_count:RcptCount", f"unix:{path}", cwd=ROOT) as milter:
        assert milter.process is not None and milter.process.poll() is None


def test_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with MilterProcess("examples.rcpt_count:RcptCount", f"unix:{path}", cwd=ROOT) as first:
        second = subprocess.run(
            [sys.executable, "-m", "pymilterkit", "run", "examples.rcpt_count:RcptCount",
             "--socket", f"unix:{path}"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert second.returncode == 2
        assert "already serving" in second.stderr
        assert first.process is not None and first.process.poll() is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tcp:25", "unknown socket type"),
        ("unix:/nonexistent-dir/x.sock", "does not exist"),
        ("inet:70000@127.0.0.1", "out of range"),
    ],
)
def test_bad_socket_spec_exits_2_with_a_clear_message(spec: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pymilterkit", "run", "examples.rcpt_count:RcptCount",
         "--socket", spec],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_socket_mode_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with MilterProcess(
        "examples.rcpt_count:RcptCount", f"unix:{path}", args=["--socket-mode", "660"], cwd=ROOT
    ):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


def test_inet_and_inet6_listen_with_nodelay() -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        probe = socket.socket(family)
        probe.bind((host, 0))
        port = probe.getsockname()[1]
        probe.close()
        kind = "inet" if family == socket.AF_INET else "inet6"
        spec = f"{kind}:{port}@{host}" if kind == "inet" else f"inet6:{port}@[{host}]"
        with MilterProcess("examples.rcpt_count:RcptCount", spec, cwd=ROOT):
            client = socket.create_connection((host, port), timeout=5)
            client.close()


def test_version_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pymilterkit", "version"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 0
    assert "libmilter 1.0.1" in result.stdout
    assert result.stdout.startswith("pymilterkit ")


def test_a_stop_right_after_start_is_clean_with_workers() -> None:
    # The socket exists before the workers do, so this SIGTERM reaches the parent while it
    # forks, or a worker before that worker has its own handler: still a clean stop.
    for _ in range(5):
        with MilterProcess("examples.rcpt_count:RcptCount", args=["--workers", "2"],
                           cwd=ROOT) as milter:
            milter.signal(signal.SIGTERM)
            assert milter.wait(30) == 0, milter.log()
            assert "Traceback" not in milter.log()


def test_workers_serve_and_stop_together() -> None:
    with MilterProcess(
        "examples.rcpt_count:RcptCount", args=["--workers", "2"], cwd=ROOT
    ) as milter:
        children = [str(pid) for pid in worker_pids(milter.pid, 2)]
        milter.signal(signal.SIGTERM)
        assert milter.wait(15) == 0, milter.log()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["examples.rcpt_count:RcptCount", "--socket", "inet:127.0.0.1:3000"],
         "Postfix writes inet:HOST:PORT, libmilter wants inet:3000@127.0.0.1"),
        (["examples.rcpt_count:RcptCount", "--socket", "unix:/tmp/x.sock", "--socket-mode",
          "rw"], "--socket-mode wants an octal mode"),
        (["no_such_module_pmk:X", "--socket", "unix:/tmp/x.sock"], "cannot import"),
        (["examples.rcpt_count:Nope", "--socket", "unix:/tmp/x.sock"], "has no 'Nope'"),
        (["examples.rcpt_count", "--socket", "unix:/tmp/x.sock"], "expected MODULE:CLASS"),
        (["examples.rcpt_count:Status", "--socket", "unix:/tmp/x.sock"],
         "not a MilterSession subclass"),
        (["examples.rcpt_count:RcptCount", "--socket", "unix:/tmp/x.sock", "--cpu-affinity",
          "fast"], "--cpu-affinity takes auto, none or CPU numbers"),
        (["examples.rcpt_count:RcptCount", "--socket", "unix:/tmp/x.sock", "--cpu-affinity",
          "4096"], "not available to this process"),
    ],
)
def test_cli_usage_errors_exit_2_without_traceback(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pymilterkit", "run", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_set_debug_level_applies_to_the_run(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    result = python(
        f"""
import threading, time
from pymilterkit import Milter, set_debug_level, shutdown
from pymilterkit.testing import MilterClient
from examples.rcpt_count import RcptCount
set_debug_level(6)
def drive():
    time.sleep(0.5)
    MilterClient("unix:{sock}").run(b"Subject: x\\r\\n\\r\\nbody\\r\\n")
    shutdown()
threading.Thread(target=drive).start()
Milter(RcptCount, "unix:{sock}").run()
"""
    )
    assert result.returncode == 0, result.stderr
    # libmilter's trace goes to C stdout; at level 6 it shows every command and the negotiation
    assert "got cmd 'O'" in result.stdout, result
    assert "milter_negotiate: mta_actions=0x1ff" in result.stdout


def test_socket_file_is_removed_after_the_run_as_root(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with MilterProcess("examples.rcpt_count:RcptCount", f"unix:{path}", cwd=ROOT) as milter:
        assert path.exists()
        milter.signal(signal.SIGTERM)
        assert milter.wait(15) == 0
    assert not path.exists()


def test_local_spec_serves_like_unix(tmp_path: Path) -> None:
    from pymilterkit.testing import MilterClient

    path = tmp_path / "m.sock"
    with MilterProcess("examples.rcpt_count:RcptCount", f"local:{path}", cwd=ROOT):
        result = MilterClient(f"unix:{path}").run(
            b"Subject: x\r\n\r\nbody\r\n", recipients=["a@example.org", "b@example.org"]
        )
    assert result.header("X-Rcpt-Count") == "2"


def test_workers_do_not_outlive_a_killed_parent() -> None:
    with MilterProcess(
        "examples.rcpt_count:RcptCount", args=["--workers", "2"], cwd=ROOT
    ) as milter:
        children = [str(pid) for pid in worker_pids(milter.pid, 2)]
        milter.signal(signal.SIGKILL)
        milter.wait(15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in children):
            time.sleep(0.05)
    alive = [p for p in children if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert alive == []


def thread_cpus(pid: int | str) -> set[frozenset[int]]:
    """The distinct CPU sets the threads of process `pid` may run on."""
    sets = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that ended since the listing (a pool worker)
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):  # the same syntax as --cpu-affinity
                cpus = parse_cpu_list(line.split(":", 1)[1])
                assert isinstance(cpus, list), line
                sets.add(frozenset(cpus))
    return sets


ALLOWED = frozenset(os.sched_getaffinity(0))
MULTI_CPU = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs to tell placements apart")


def least_confined_cpus() -> set[int]:
    """The CPUs `cpu_affinity="auto"` may pick for a process started now."""
    load = confined_elsewhere(sorted(ALLOWED))
    return {n for n in ALLOWED if load[n] == min(load.values())}


def only_cpu(pid: int | str) -> int:
    """The one CPU all threads of `pid` are confined to (fails if there is not exactly one)."""
    sets = thread_cpus(pid)
    assert len(sets) == 1 and len(next(iter(sets))) == 1, sets
    return next(iter(next(iter(sets))))


@MULTI_CPU
def test_a_single_process_runs_all_its_threads_on_one_cpu_by_default() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as milter:
        result = MilterClient(milter.socket).run(b"\r\n", recipients=["a@example.org"])
        assert result.header("X-Rcpt-Count") == "1"
        cpu = only_cpu(milter.pid)  # main, libmilter's listener, sigwait, pool workers
        log = milter.log()
    assert f"running on CPU {cpu} (cpu_affinity='auto')" in log


@MULTI_CPU
def test_two_milters_on_one_host_do_not_share_a_cpu() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as first:
        cpu_first = only_cpu(first.pid)
        # Other processes may come and go meanwhile: what auto could pick just before and
        # just after the second start (both count the first milter).
        candidates = least_confined_cpus()
        with MilterProcess("examples.rcpt_count:RcptCount", cwd=ROOT) as second:
            MilterClient(second.socket).run(b"\r\n", recipients=["a@example.org"])
            cpu_second = only_cpu(second.pid)
            load = confined_elsewhere(sorted(ALLOWED))
            load[cpu_second] -= 1  # the second milter itself
            candidates |= {n for n in ALLOWED if load[n] == min(load.values())}
    assert cpu_second in candidates, (cpu_first, cpu_second, candidates)
    # With no other confined processes skewing the count (CI: nothing else runs), the first
    # milter's CPU is the one the second avoids. Others confined to the other CPUs (parallel
    # test runs on this host) can make sharing the right choice: the assertion above holds then.
    foreign = dict(load)
    foreign[cpu_first] -= 1  # the first milter itself
    if len(set(foreign.values())) == 1:
        assert cpu_second != cpu_first, (cpu_first, load)


@MULTI_CPU
def test_cpu_affinity_none_leaves_placement_to_the_scheduler() -> None:
    with MilterProcess(
        "examples.rcpt_count:RcptCount", args=["--cpu-affinity", "none"], cwd=ROOT
    ) as milter:
        MilterClient(milter.socket).run(b"\r\n", recipients=["a@example.org"])
        assert thread_cpus(milter.pid) == {ALLOWED}


@MULTI_CPU
def test_pre_forked_workers_get_one_cpu_each() -> None:
    with MilterProcess(
        "examples.rcpt_count:RcptCount", args=["--workers", "2"], cwd=ROOT
    ) as milter:
        children = [str(pid) for pid in worker_pids(milter.pid, 2)]
        deadline = time.monotonic() + 10
        placed: list[set[frozenset[int]]] = []
        while time.monotonic() < deadline:
            placed = [thread_cpus(pid) for pid in children]
            if all(len(p) == 1 and len(next(iter(p))) == 1 for p in placed):
                break
            time.sleep(0.05)
        assert thread_cpus(milter.pid) == {ALLOWED}  # the supervising parent is not confined
    cpus = [next(iter(next(iter(p)))) for p in placed]
    assert len(set(cpus)) == 2, placed


def _placement(parent: int) -> dict[str, int] | None:
    """Each worker's name (`w1 RcptCount`) and its one CPU, once every worker has both."""
    placed: dict[str, int] = {}
    for pid in children(parent):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            sets = thread_cpus(pid)
        except FileNotFoundError:  # it ended meanwhile
            return None
        if not name.startswith("w") or len(sets) != 1 or len(next(iter(sets))) != 1:
            return None
        placed[name] = next(iter(next(iter(sets))))
    return placed


def _next_generation(milter: MilterProcess, reloads: int, old: set[int]) -> dict[str, int]:
    """The placement of the workers once reload number `reloads` is done and `old` left."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = children(milter.pid)
        if milter.log().count("reloaded in") == reloads and len(now - old) == 2 == len(now):
            placed = _placement(milter.pid)
            if placed is not None and len(placed) == 2:
                return placed
        time.sleep(0.05)
    raise AssertionError(f"reload {reloads} did not settle:\n{milter.log()}")


@MULTI_CPU
def test_fresh_workers_keep_their_slots_cpu_across_reloads() -> None:
    """The supervisor plans the CPUs once: a fresh worker that planned for itself read /proc
    while its sibling confined itself, and both could land on one CPU."""
    with MilterProcess(
        "examples.rcpt_count:RcptCount", args=["--workers", "2"], cwd=ROOT
    ) as milter:
        old = set(worker_pids(milter.pid, 2))
        planned = _next_generation(milter, 0, set())
        assert len(set(planned.values())) == 2, planned
        for reload in range(1, 4):
            milter.signal(signal.SIGHUP)
            assert _next_generation(milter, reload, old) == planned, (reload, milter.log())
            old = children(milter.pid)


def test_the_supervisor_logs_its_final_stop() -> None:
    with MilterProcess("examples.rcpt_count:RcptCount", args=["--workers", "2"],
                       cwd=ROOT) as milter:
        worker_pids(milter.pid, 2)
        milter.signal(signal.SIGTERM)
        assert milter.wait(30) == 0, milter.log()
        lines = [ln for ln in milter.log().splitlines() if "pymilterkit[" in ln]
    (final,) = [i for i, ln in enumerate(lines) if "supervisor stopped" in ln]
    assert lines[final].endswith("RcptCount: supervisor stopped (signal SIGTERM)"), lines
    assert f"pymilterkit[{milter.pid}]" in lines[final]
    workers_stopped = [i for i, ln in enumerate(lines) if "stopped: " in ln]
    assert len(workers_stopped) == 2 and max(workers_stopped) < final, lines
