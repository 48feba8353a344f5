"""The metrics endpoint's bounds: slow, huge and many clients cannot take what mail needs."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import selectors
import socket
import time
from collections.abc import Iterator

import pytest

from pymilterkit._metrics_http import MAX_REQUEST, REQUEST_DEADLINE
from pymilterkit.testing import MilterClient, MilterProcess

from .test_metrics import MESSAGE, ROOT, TARGET, endpoint, get

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def milter() -> Iterator[MilterProcess]:
    with MilterProcess(TARGET, args=["--metrics", "127.0.0.1:0"], cwd=ROOT) as process:
        endpoint(process)
        yield process


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room in this test process for a thousand and more sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _cap(milter: MilterProcess) -> int:
    found = re.search(r"at most (\d+) connections at once", milter.log())
    assert found, milter.log()
    return int(found[1])


def _connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=10)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_client_that_sends_slowly_is_cut_at_the_deadline(milter: MilterProcess) -> None:
    address = endpoint(milter)
    with _connect(address) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        sent_until_closed = 0
        try:
            while time.monotonic() - start < REQUEST_DEADLINE + 5:
                sock.sendall(b"X: y\r\n")  # a header every 0.5 s, never the end
                sent_until_closed += 1
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - start
    assert elapsed < REQUEST_DEADLINE + 2, f"held {elapsed:.1f} s"
    assert get(address, "/healthz")[0] == 200


def test_a_huge_request_is_refused_without_reading_it_all(milter: MilterProcess) -> None:
    address = endpoint(milter)
    rss_before = _rss_kib(milter.pid)
    socks = []
    for _ in range(40):
        sock = _connect(address)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"a" * 65000 + b"\r\n")
        socks.append(sock)
    answers = []
    for sock in socks:
        sock.settimeout(10)
        try:
            answers.append(sock.recv(100))
        except ConnectionResetError:
            answers.append(b"reset")
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 431") or a in (b"", b"reset") for a in answers), answers
    assert sum(a.startswith(b"HTTP/1.1 431") for a in answers) >= 1
    assert _rss_kib(milter.pid) - rss_before < 20 * 1024
    assert MAX_REQUEST < 65000
    assert get(address, "/healthz")[0] == 200


@pytest.mark.parametrize("size", [MAX_REQUEST, MAX_REQUEST + 1, MAX_REQUEST + 3000])
def test_the_request_limit_holds_for_a_head_that_comes_in_one_piece(
    milter: MilterProcess, size: int
) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
    head += b"a" * (size - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == size
    with _connect(endpoint(milter)) as sock:
        sock.settimeout(5)
        sock.sendall(head)
        answer = sock.recv(100)
    assert answer.startswith(b"HTTP/1.1 200" if size <= MAX_REQUEST else b"HTTP/1.1 431"), answer


def test_past_the_cap_a_silent_client_is_refused_at_once_and_mail_flows(
    milter: MilterProcess, many_files: None
) -> None:
    address = endpoint(milter)
    threads_before = _threads(milter.pid)
    rss_before = _rss_kib(milter.pid)
    holders = [_connect(address) for _ in range(_cap(milter))]
    try:
        time.sleep(0.3)  # all accepted and waiting for a request that never comes
        late = _connect(address)  # silent too: past the cap, refused at once
        late.settimeout(2)
        start = time.monotonic()
        refused = late.recv(200)
        assert refused.startswith(b"HTTP/1.1 503"), refused
        assert late.recv(100) == b""  # and closed
        assert time.monotonic() - start < 1.5
        late.close()
        assert _threads(milter.pid) == threads_before  # no thread per connection
        assert _rss_kib(milter.pid) - rss_before < 50 * 1024
        result = MilterClient(milter.socket).run(MESSAGE, recipients=["ok@example.org"])
        assert result.delivered  # mail flows while the endpoint is full
    finally:
        for sock in holders:
            sock.close()
    assert get(address, "/healthz")[0] == 200


def test_a_burst_of_a_thousand_scrapes_is_answered(
    milter: MilterProcess, many_files: None
) -> None:
    address = endpoint(milter)
    selector = selectors.DefaultSelector()
    replies: dict[socket.socket, bytearray] = {}
    replies_of: dict[int, socket.socket] = {}
    start = time.monotonic()
    for _ in range(1000):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(address)
        selector.register(sock, selectors.EVENT_WRITE)
        replies[sock] = bytearray()
        replies_of[sock.fileno()] = sock
    answered = refused = 0
    while selector.get_map() and time.monotonic() - start < 10:
        for key, events in selector.select(0.5):
            sock = replies_of[key.fd]
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                except OSError:
                    selector.unregister(sock)
                    continue
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                replies[sock] += data
                continue
            selector.unregister(sock)
            answered += replies[sock].startswith(b"HTTP/1.1 200")
            refused += replies[sock].startswith(b"HTTP/1.1 503")
    elapsed = time.monotonic() - start
    for sock in replies:
        sock.close()
    selector.close()
    if _cap(milter) >= 1000:  # the burst fits under the cap: 99% answered
        assert answered >= 990, f"{answered} of 1000 answered in {elapsed:.1f} s"
    else:  # under a small descriptor limit: answered, or refused at once past the cap
        assert answered + refused >= 990, f"{answered}+{refused} of 1000 in {elapsed:.1f} s"
