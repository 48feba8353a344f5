"""Fixtures for end-to-end tests against a private, throwaway Postfix (see ``postfix.py``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from .postfix import PostfixFactory, PostfixInstance, make_socket_dir
from .sendmail import SendmailInstance

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e with ``e2e`` (select or skip with ``-m``)."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the e2e tests start a private Postfix, whose master must run as root: "
            "run them as root (CI does), e.g. `sudo .venv/bin/pytest tests/e2e`",
            pytrace=False,
        )


@pytest.fixture
def postfix_factory(tmp_path: Path) -> Iterator[PostfixFactory]:
    """A function ``make(smtpd_milters="", extra_config=None) -> PostfixInstance`` returning
    started instances; all are stopped at teardown and their maillogs copied to ``tmp_path``."""
    _require_root()
    instances: list[PostfixInstance] = []

    def make(
        smtpd_milters: str = "", extra_config: Mapping[str, str] | None = None
    ) -> PostfixInstance:
        instance = PostfixInstance(smtpd_milters, extra_config)
        instances.append(instance)
        return instance.start()

    yield make
    for number, instance in enumerate(instances):
        instance.stop()
        if instance.log_path.exists():
            shutil.copyfile(instance.log_path, tmp_path / f"postfix-{number}.maillog")
        instance.cleanup()


@pytest.fixture
def milter_socket_dir(tmp_path: Path) -> Iterator[Path]:
    """A short directory (mode 0o777, outside pytest's 0700 tree) for ``unix:`` milter
    sockets that Postfix's smtpd (user ``postfix``) can reach; removed at teardown."""
    path = make_socket_dir(tmp_path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sendmail_factory(tmp_path: Path) -> Iterator[Callable[[str], SendmailInstance]]:
    """A function ``make(milter_spec) -> SendmailInstance`` returning started private Sendmail
    daemons (see ``sendmail.py``); all are stopped by PID at teardown, their output kept."""
    _require_root()
    instances: list[SendmailInstance] = []

    def make(milter_spec: str) -> SendmailInstance:
        instance = SendmailInstance(milter_spec)
        instances.append(instance)
        return instance.start()

    yield make
    for number, instance in enumerate(instances):
        instance.stop()
        (tmp_path / f"sendmail-{number}.out").write_text(instance.log_text())
        instance.cleanup()
