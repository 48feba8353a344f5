"""The worked example of testing a filter with pymilterkit's pytest fixtures.

Run it:  pytest examples/test_rcpt_count.py
(the fixtures come from the `pymilterkit` pytest plugin, installed with the package).
"""

from __future__ import annotations

from examples.rcpt_count import RcptCount
from pymilterkit import Status
from pymilterkit.testing import apply_modifications
from pymilterkit.testing.pytest_plugin import HarnessFactory, ProcessFactory

MESSAGE = b"From: alice@example.net\r\nSubject: hello\r\n\r\nHi!\r\n"


def test_counts_recipients(milter_harness: HarnessFactory) -> None:
    result = milter_harness(RcptCount).run(MESSAGE, recipients=["bob@example.org",
                                                               "carol@example.org"])
    assert result.status is Status.CONTINUE
    assert result.header("X-Rcpt-Count") == "2"
    assert apply_modifications(MESSAGE, result).endswith(
        b"X-Rcpt-Count: 2\r\n\r\nHi!\r\n")


def test_counts_recipients_behind_the_real_libmilter(milter_process: ProcessFactory) -> None:
    client = milter_process(RcptCount)  # runs `pymilterkit run examples.rcpt_count:RcptCount`
    result = client.run(MESSAGE, recipients=["bob@example.org"])
    assert result.header("X-Rcpt-Count") == "1"
