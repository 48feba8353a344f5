"""Run a filter in its own process (libmilter allows one run per process)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .._errors import MilterError
from .._socketspec import connects, parse_socket_spec

__all__ = ["MilterProcess"]


def _toml_value(value: object, where: str) -> str:
    """One TOML value for the `[filter]` table (strings, numbers, booleans, lists, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, Mapping):
        return "{" + ", ".join(
            f"{json.dumps(str(k))} = {_toml_value(v, f'{where}.{k}')}" for k, v in value.items()
        ) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return "[" + ", ".join(_toml_value(v, where) for v in items) + "]"
    raise TypeError(f"config {where}: {type(value).__name__} has no TOML form")


def filter_table(config: object) -> str:
    """A `[filter]` table of a config file from a dataclass instance or a mapping."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dataclass instance or a mapping, not {config!r}")
    lines = ["[filter]"]
    lines += [f"{json.dumps(str(k))} = {_toml_value(v, str(k))}" for k, v in config.items()]
    return "\n".join(lines) + "\n"


class MilterProcess:
    """`pymilterkit run TARGET --socket SPEC` in a child process, as a context manager.

    Without `socket`, a unix socket in a fresh temporary directory is used. `config` (a
    dataclass instance or a mapping) becomes the `[filter]` table of a config file given with
    `--config`: the filter's own settings, as in production. On entry it waits until the socket
    accepts connections; on exit it sends SIGTERM and waits.
    """

    def __init__(
        self,
        target: str,
        socket_spec: str | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        startup_timeout: float = 15.0,
        config: object | None = None,
    ) -> None:
        # Removed by __exit__, or when this object is collected (a start that failed in
        # __enter__ gets no __exit__, and its log must stay readable until then).
        self._dirs: list[weakref.finalize[Any, Any]] = []
        if socket_spec is None:
            socket_spec = f"unix:{self._directory('pymilterkit-')}/milter.sock"
        self.socket = socket_spec
        self.spec = parse_socket_spec(socket_spec)
        self.target = target
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        log_dir = self._directory("pymilterkit-log-")
        self.log_path = Path(log_dir) / "milter.log"
        if config is not None:
            config_path = Path(log_dir) / "filter.toml"
            config_path.write_text(filter_table(config), encoding="utf-8")
            self.args += ["--config", str(config_path)]
        self.returncode: int | None = None

    def _directory(self, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=prefix)
        os.chmod(path, 0o755)
        self._dirs.append(weakref.finalize(self, shutil.rmtree, path, ignore_errors=True))
        return path

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        """The command line of the child."""
        return [
            sys.executable,
            "-m",
            "pymilterkit",
            "--log-level",
            "DEBUG",
            "run",
            self.target,
            "--socket",
            self.socket,
            *self.args,
        ]

    def start(self) -> MilterProcess:
        """Start the child and wait until its socket accepts connections."""
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                failure = f"milter exited with {self.process.returncode} during start"
                break
            if self._accepts():
                return self
            time.sleep(0.05)
        else:
            failure = f"milter did not listen on {self.socket} in time"
        self.stop()
        raise MilterError(f"{failure}:\n{self.log()}")

    def _accepts(self) -> bool:
        return connects(self.spec)

    def log(self) -> str:
        """Everything the child wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        """Send a signal to the child (only to our own child, by PID)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the child to exit and return its exit status."""
        assert self.process is not None
        self.returncode = self.process.wait(timeout)
        return self.returncode

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the child, wait (SIGKILL after `timeout`), return its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.returncode = self.process.returncode
        return self.returncode

    def __enter__(self) -> MilterProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        for remove in self._dirs:
            remove()
