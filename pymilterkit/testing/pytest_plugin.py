"""pytest fixtures for testing filters (registered as the `pymilterkit` pytest11 plugin).

* `milter_harness` -- a factory: `milter_harness(MyFilter)` returns a `Harness` that re-raises
  exceptions from stage methods (so a bug fails the test with its traceback). Pass
  `reraise=False` to see the runner's error policy instead.
* `milter_process` -- a factory: `milter_process("mypkg.filters:MyFilter")` (or the class
  itself, if it is importable by module and name) starts the filter with the real runner on a
  unix socket in a temporary directory and returns a `MilterClient` connected to it; the
  process is stopped (by PID) when the test ends. `config=` (a dataclass instance or a
  mapping) gives the filter its `[filter]` settings through a config file, as in production;
  `args=[...]`, `env=` and `cwd=` go to `MilterProcess`.

    def test_adds_header(milter_harness):
        result = milter_harness(RcptCount).run(MESSAGE, recipients=["a@x", "b@y"])
        assert result.header("X-Rcpt-Count") == "2"

Importing this module does not load libmilter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from .._session import MilterSession
from ._client import MilterClient
from ._harness import Harness
from ._process import MilterProcess

__all__ = ["HarnessFactory", "ProcessFactory", "milter_harness", "milter_process"]


class HarnessFactory(Protocol):
    """What `milter_harness` gives: `milter_harness(MyFilter, **Harness options)`."""

    def __call__(self, session_class: type[MilterSession], **options: Any) -> Harness:
        """A `Harness` for `session_class`, closed when the test ends."""
        ...


class ProcessFactory(Protocol):
    """What `milter_process` gives: `milter_process("mod:Class", config=..., args=[...])`."""

    def __call__(
        self, target: str | type[MilterSession], *, timeout: float = 10.0, **options: Any
    ) -> MilterClient:
        """A `MilterClient` for the filter run in its own process, stopped when the test ends."""
        ...


def _target(target: str | type[MilterSession]) -> str:
    if isinstance(target, str):
        return target
    module = target.__module__
    if module == "__main__" or "<locals>" in target.__qualname__:
        raise ValueError(
            f"{target.__qualname__} cannot be imported by a child process; define it at the "
            f"top level of an importable module or pass 'module:Class'"
        )
    return f"{module}:{target.__qualname__}"


@pytest.fixture
def milter_harness() -> Iterator[HarnessFactory]:
    """Factory for in-process harnesses that re-raise stage-method exceptions by default.

    Each harness is closed when the test ends (its class's `on_worker_stop` runs).
    """
    made: list[Harness] = []

    def make(session_class: type[MilterSession], **options: Any) -> Harness:
        options.setdefault("reraise", True)
        harness = Harness(session_class, **options)
        made.append(harness)
        return harness

    try:
        yield make
    finally:
        for harness in reversed(made):
            harness.close()


@pytest.fixture
def milter_process() -> Iterator[ProcessFactory]:
    """Factory: start a filter with the real runner and get a `MilterClient` for it."""
    started: list[MilterProcess] = []

    def make(
        target: str | type[MilterSession], *, timeout: float = 10.0, **options: Any
    ) -> MilterClient:
        process = MilterProcess(_target(target), **options)
        started.append(process)  # stopped and cleaned up at the end even if the start fails
        process.start()
        client = MilterClient(process.socket, timeout=timeout)
        client.process = process  # type: ignore[attr-defined]
        return client

    try:
        yield make
    finally:
        for process in reversed(started):
            process.__exit__(None, None, None)
