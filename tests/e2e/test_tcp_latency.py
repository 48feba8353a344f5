"""A filter on TCP does not stall: no ~40 ms Nagle/delayed-ACK wait per message through Postfix.

libmilter writes the end-of-message answer as several small packets; on a socket without
TCP_NODELAY the last one waits for the MTA's delayed ACK (~40 ms), every message. The runner
listens on its own socket with TCP_NODELAY (handed to libmilter as ``fd:N``), and on TCP it
asks for the DATA stage and answers it, whose macros Postfix would otherwise send as an
unanswered packet that the end of message then waits behind. No-reply stages are kept: the
variants below cover filters that answer every stage, none but the end of message, the
benchmark's (no-reply MAIL and RCPT), and headers without end of headers (which the runner
then keeps unanswered). The stall is deterministic, so a per-message time well under 40 ms is a
behaviour check here, not a benchmark.
"""

from __future__ import annotations

import statistics
import time

import pytest

from .mta import Start

pytestmark = pytest.mark.e2e

MESSAGE = (
    b"From: alice@example.net\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: latency\r\n"
    b"\r\n"
    b"hello\r\n"
)
RECIPIENTS = ["bob@example.com", "carol@example.org", "dave@example.com"]
TARGETS = {
    "answered": "examples.rcpt_count:RcptCount",
    "noreply-envelope": "benchmarks.pymilterkit_rcptcount:RcptCountNoReply",
    "noreply-everywhere": "tests.e2e.filters:QuietEverywhere",
    "headers-no-eoh": "tests.integration.filters:HeadersBodyAndRcpt",  # EOH kept, unanswered
}
# The header each filter adds (HeadersBodyAndRcpt: 3 header lines, 2 added by Postfix; 7 bytes).
ADDED = {"headers-no-eoh": "X-Shape: 5 7"}


@pytest.mark.parametrize("variant", sorted(TARGETS))
def test_per_message_time_over_tcp_is_well_under_40ms(start: Start, variant: str) -> None:
    setup = start(TARGETS[variant], inet=True, extra_config={"defer_transports": "sink"})
    postfix = setup.postfix
    times: list[float] = []
    with setup.smtp() as smtp:
        smtp.ehlo("client.example.net")
        smtp.sendmail("alice@example.net", RECIPIENTS, MESSAGE)  # warm-up
        for _ in range(20):
            began = time.perf_counter()
            refused = smtp.sendmail("alice@example.net", RECIPIENTS, MESSAGE)
            times.append(time.perf_counter() - began)
            assert refused == {}
    median_ms = statistics.median(times) * 1000
    assert median_ms < 25, f"median {median_ms:.1f} ms per message over TCP: {times}"

    # The milter really ran: its header is on the queued (deferred) messages.
    queued = postfix.queued_ids(21)
    assert ADDED.get(variant, "X-Rcpt-Count: 3") in postfix.postcat(queued[0])
