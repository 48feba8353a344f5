"""`pymilterkit run --config FILE.toml` on the real runner: the `[filter]` table reaches the
filter, flags override the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymilterkit.testing import MilterClient, MilterProcess, RecipientAdded

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_the_filter_table_reaches_the_filter(tmp_path: Path) -> None:
    config = tmp_path / "routing.toml"
    # The file's socket is overridden by MilterProcess's --socket: a flag wins over the file.
    config.write_text(
        'target = "examples.routing:Routing"\n'
        f'socket = "unix:{tmp_path}/unused.sock"\n'
        "[filter.archive]\n"
        '"orders@example.com" = "books@example.com"\n'
    )
    with MilterProcess("examples.routing:Routing", args=["--config", str(config)],
                       cwd=ROOT) as milter:
        client = MilterClient(milter.socket)
        orders = client.run(b"Subject: x\r\n\r\nbody\r\n", recipients=["orders@example.com"])
        sales = client.run(b"Subject: x\r\n\r\nbody\r\n", recipients=["sales@example.com"])
    assert orders.modifications == (RecipientAdded("<books@example.com>", None),)
    assert sales.modifications == ()  # the file's table replaced the default one
    assert not (tmp_path / "unused.sock").exists()
