"""Faults: a worker killed under a real Postfix, a stage slower than the MTA's timeout, SIGTERM
while connections are mid-message with pre-forked workers."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from pathlib import Path

import pytest

from pymilterkit import MilterTimeout, Status
from pymilterkit.testing import MilterClient, MilterProcess
from tests.e2e.conftest import milter_socket_dir, postfix_factory
from tests.e2e.postfix import PostfixFactory
from tests.helpers import children, worker_pids

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
__all__ = ["milter_socket_dir", "postfix_factory"]  # fixtures used here

MESSAGE = b"From: a@example.net\r\nTo: b@example.com\r\nSubject: fault test\r\n\r\nbody\r\n"


def wait_for(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def clean_exit(milter: MilterProcess) -> str:
    milter.signal(signal.SIGTERM)
    assert milter.wait(30) == 0, milter.log()
    log = milter.log()
    assert "Traceback" not in log and "Exception ignored" not in log, log[-3000:]
    return log


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix needs root")
def test_sigkill_of_a_worker_under_postfix_fails_only_its_connection(
    postfix_factory: PostfixFactory, milter_socket_dir: Path, tmp_path: Path
) -> None:
    sock = milter_socket_dir / "faults.sock"
    marker = tmp_path / "blocked.pids"
    milter = MilterProcess(
        "tests.reliability.filters:Blocking", f"unix:{sock}", cwd=ROOT,
        args=["--workers", "2", "--socket-group", "postfix"],
        env={**os.environ, "BLOCKING_PID_FILE": str(marker)},
    )
    with milter:
        workers = set(worker_pids(milter.pid, 2))
        postfix = postfix_factory(f"unix:{sock}", {"milter_default_action": "tempfail"})

        outcome: dict[str, object] = {}

        def doomed() -> None:
            try:
                with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=60) as smtp:
                    smtp.sendmail("sleep-20@example.net", ["doomed@example.com"], MESSAGE)
                outcome["doomed"] = "delivered"
            except smtplib.SMTPException as exc:
                outcome["doomed"] = exc

        thread = threading.Thread(target=doomed)
        thread.start()
        wait_for(lambda: marker.exists() and marker.read_text().strip(), 20, "a blocked worker")
        victim = int(marker.read_text().split()[0])
        assert victim in workers
        # Another connection is served by the other worker meanwhile.
        with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=60) as smtp:
            smtp.sendmail("ok@example.net", ["first@example.com"], MESSAGE)
        os.kill(victim, signal.SIGKILL)
        thread.join(60)
        # Only the connection of the killed worker failed: Postfix applied its
        # milter_default_action (tempfail) to that message and told the client.
        failure = outcome.get("doomed")
        assert isinstance(failure, smtplib.SMTPResponseException), outcome
        assert 400 <= failure.smtp_code < 500
        wait_for(lambda: len(children(milter.pid)) == 2 and victim not in children(milter.pid),
                 15, "a replacement worker")
        replacement = children(milter.pid) - workers
        assert len(replacement) == 1, (workers, children(milter.pid))
        for n in range(4):
            with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=60) as smtp:
                smtp.sendmail("ok@example.net", [f"later{n}@example.com"], MESSAGE)
        delivered = postfix.wait_for_delivery(5, timeout=60)
        recipients = sorted(r for d in delivered for r in d.recipients)
        assert recipients == sorted(
            ["first@example.com"] + [f"later{n}@example.com" for n in range(4)])
        # (A worker serves several connections on its threads: the first message may have
        # been handled by the victim before it died; the later ones by the live workers.)
        later = {str(d.message["X-Pid"]) for d in delivered
                 if d.recipients[0].startswith("later")}
        assert later and later <= {str(p) for p in children(milter.pid)}
        log = clean_exit(milter)
    assert f"worker {victim} died" in log


def test_a_stage_slower_than_the_client_timeout_wedges_nothing() -> None:
    with MilterProcess("tests.reliability.filters:Blocking", cwd=ROOT) as milter:
        impatient = MilterClient(milter.socket, timeout=1)
        conn = impatient.open()
        conn.negotiate()
        began = time.monotonic()
        with pytest.raises(MilterTimeout):
            conn.mail("<sleep-4@example.net>")
        conn.close()  # the MTA gives up and hangs up, as Postfix does after its timeout
        assert time.monotonic() - began < 2
        # While that stage method still sleeps, other connections are served at once.
        client = MilterClient(milter.socket, timeout=10)
        for _ in range(5):
            started = time.monotonic()
            result = client.run(b"Subject: x\r\n\r\nbody\r\n")
            assert result.status is Status.CONTINUE and result.header("X-Pid")
            assert time.monotonic() - started < 1.0
        time.sleep(4)  # the slow method returns; libmilter finds the connection gone
        result = client.run(b"Subject: x\r\n\r\nbody\r\n")
        assert result.status is Status.CONTINUE
        log = clean_exit(milter)
    stopped = [line for line in log.splitlines() if "stopped:" in line]
    assert stopped and " 0 left open" in stopped[-1], log


def test_sigterm_mid_message_with_workers_closes_every_session(tmp_path: Path) -> None:
    lifecycle = tmp_path / "lifecycle.log"
    with MilterProcess("tests.integration.filters:Lifecycle", cwd=ROOT,
                       args=["--workers", "2", "--drain-timeout", "0"],  # no drain: end them
                       env={**os.environ, "LIFECYCLE_LOG": str(lifecycle)}) as milter:
        client = MilterClient(milter.socket, timeout=10)
        conns = [client.open() for _ in range(6)]
        for n, conn in enumerate(conns):
            conn.negotiate()
            conn.connect(f"c{n}.example", None)
            conn.mail("<a@example.org>")
        wait_for(lambda: lifecycle.read_text().count(" mail") == 6, 10, "six sessions")
        # Both workers serving (one may still be starting while the other took all six; a
        # worker stopped before it serves logs no "stopped:" line).
        wait_for(lambda: milter.log().count(" listening on ") == 2, 10, "two workers")
        log = clean_exit(milter)
        for conn in conns:
            conn.close()
    lines = lifecycle.read_text().splitlines()
    # Session names are per worker process (s1, s2, ... in each), so count events: every
    # session that was mid-message got on_abort and on_close, though libmilter abandoned them.
    assert len([line for line in lines if " connect " in line]) == 6
    assert sum(1 for line in lines if line.endswith(" abort")) == 6, lines
    assert sum(1 for line in lines if line.endswith(" close")) == 6, lines
    stopped = [line for line in log.splitlines() if "stopped:" in line]
    assert len(stopped) == 2, log  # one per worker
    served = sum(int(line.split("stopped: ")[1].split()[0]) for line in stopped)
    assert served >= 6
