"""`async def` filters and slow end of message behind a real Postfix.

The policy example (`examples.lookup`) checks recipients against a policy service running in
this test on 127.0.0.1; a slow on_eom survives Postfix's `milter_content_timeout` because the
milter sends progress while it runs.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.lookup import policy_service

from .mta import Start, message


@pytest.fixture
def policy_port() -> Iterator[int]:
    with policy_service(0.2) as port:
        yield port


def test_async_policy_lookups_through_postfix(
    start: Start, policy_port: int, tmp_path: Path
) -> None:
    config = tmp_path / "lookup.toml"
    config.write_text(f"[filter]\nport = {policy_port}\ntimeout = 5.0\n")
    setup = start("examples.lookup:PolicyLookup", args=["--config", str(config)])
    refused = setup.send(
        message(), ["bob@example.com", "bad@example.com", "carol@example.org"]
    )
    assert refused == {"bad@example.com": (550, b"5.7.1 no such mailbox")}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.message["X-Policy-Checked"] == "2"
    assert sorted(delivered.recipients) == ["bob@example.com", "carol@example.org"]


SLOW = {"milter_content_timeout": "2s"}  # Postfix gives end of message 2 s without progress


@pytest.mark.parametrize("target", ["SlowEom", "SlowEomSync"])
def test_a_slow_eom_with_progress_outlives_the_content_timeout(start: Start, target: str) -> None:
    setup = start(
        f"tests.integration.async_filters:{target}",
        extra_config=SLOW,
        args=["--progress-interval", "0.5"],
        env={"PMK_DELAY": "4"},
    )
    assert setup.send(message(), ["bob@example.com"]) == {}
    [delivered] = setup.postfix.wait_for_delivery(1)
    assert delivered.message["X-Slow"] == "done"


def test_without_progress_the_content_timeout_fires(start: Start) -> None:
    """The control: the same slow on_eom with progress off is dropped by Postfix."""
    setup = start(
        "tests.integration.async_filters:SlowEom",
        extra_config=SLOW,
        args=["--progress-interval", "0"],
        env={"PMK_DELAY": "4"},
    )
    with pytest.raises(smtplib.SMTPDataError) as raised:
        setup.send(message(), ["bob@example.com"])
    assert raised.value.smtp_code == 451  # milter_default_action = tempfail
    for _ in range(100):  # the cleanup daemon's log line may come a moment later
        if "reply packet header: Connection timed out" in setup.postfix.log_text():
            break
        time.sleep(0.05)
    assert "can't read SMFIC_BODYEOB reply packet header: Connection timed out" in (
        setup.postfix.log_text()
    )
