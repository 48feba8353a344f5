"""Fixtures for end-to-end tests against a private, throwaway Postfix (see ``postfix.py``) or
Sendmail (``sendmail.py``), and a filter behind it (``start``, see ``mta.py``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from pymilterkit.testing import MilterProcess

from .mta import MTAS, POSTFIX, Mta, Setup, Start
from .postfix import PostfixFactory, PostfixInstance, free_port, make_socket_dir
from .sendmail import SendmailInstance

_HERE = Path(__file__).parent
ROOT = _HERE.parents[1]


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


@pytest.fixture
def mta(request: pytest.FixtureRequest) -> Mta:
    """The MTA of the test: Postfix, unless the test is parametrized with ``mta.on``."""
    param: Mta = getattr(request, "param", MTAS[POSTFIX])
    return param


@pytest.fixture
def start(mta: Mta, request: pytest.FixtureRequest) -> Iterator[Start]:
    """``start("module:Class", inet=False, extra_config=None, args=(), env=None)``: a filter
    and an MTA using it (``extra_config``: Postfix main.cf settings).

    Postfix's smtpd (user ``postfix``) reaches unix sockets in a 0777 directory, made 0666;
    Sendmail (as root) refuses a socket in a group- or world-writable directory ("unsafe"), so
    its sockets live in a 0700 directory of root's.
    """
    # Asked for here, not when first used, so that they are torn down after this fixture.
    factory: Callable[..., PostfixInstance | SendmailInstance]
    if mta.name == POSTFIX:
        socket_dir: Path = request.getfixturevalue("milter_socket_dir")
        factory = request.getfixturevalue("postfix_factory")
    else:
        socket_dir = Path(tempfile.mkdtemp(prefix="pmk-smsock-", dir="/tmp"))
        factory = request.getfixturevalue("sendmail_factory")
    setups: list[Setup] = []
    processes: list[MilterProcess] = []

    def make(
        target: str,
        *,
        inet: bool = False,
        extra_config: dict[str, str] | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Setup:
        if inet:
            port = free_port()
            milter_spec = f"inet:{port}@127.0.0.1"
            mta_spec = f"inet:127.0.0.1:{port}" if mta.name == POSTFIX else milter_spec
        else:
            milter_spec = mta_spec = f"unix:{socket_dir / f'm{len(processes)}.sock'}"
        socket_args = ["--socket-mode", "666"] if mta.name == POSTFIX and not inet else []
        process = MilterProcess(
            target, milter_spec, args=[*socket_args, *args], cwd=ROOT,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip
        processes.append(process)
        process.start()
        if mta.name == POSTFIX:
            server = factory(mta_spec, extra_config)
        else:
            assert extra_config is None, "extra_config is Postfix's main.cf"
            server = factory(mta_spec)
        setup = Setup(process, server, mta)
        setups.append(setup)
        return setup

    yield make
    for process in processes:
        process.stop()
    for setup in setups:  # shown by pytest only when the test failed
        print(f"--- milter log ({setup.milter.target}) ---\n{setup.milter.log()}")
        print(f"--- {mta.name} log ---\n{setup.server.log_text()}")
    for process in processes:
        process.__exit__(None, None, None)
    if mta.name != POSTFIX:
        shutil.rmtree(socket_dir, ignore_errors=True)
