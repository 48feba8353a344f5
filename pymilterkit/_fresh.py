"""Starting fresh worker processes: how a reload gets workers that import the filter anew.

A forked worker shares its parent's imported modules; a reload must not (the filter's new code
and module state). So the supervisor starts a new interpreter (`Recipe.spawn`) that runs
`__main__.fresh_worker`: it parses the command line again, or finds the session class by name
(`class_target`: `module:Class`, or the file a class came from) and takes the same
`RunOptions`, and serves as worker `slot` on the inherited listening descriptor. The
description travels in the environment variable `PYMILTERKIT_WORKER` (JSON), removed from the
worker's environment before any filter code runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pickle
import sys
from typing import Any

from . import _logging, _metrics
from ._options import RunOptions
from ._signals import HANDLED_SIGNALS

__all__ = ["ENV", "Recipe", "class_target"]

ENV = "PYMILTERKIT_WORKER"

_BOOT = (
    # First close what leaked in: libmilter sets close-on-exec on an accepted connection only
    # after accept() returns, so a spawn in between hands the new process a copy, and the MTA
    # would then wait for an end that never comes when the supervisor closes its copy.
    "import os; k = {keep!r}; "
    "[os.closerange(a + 1, b) for a, b in zip([2, *k], [*k, os.sysconf('SC_OPEN_MAX')])]; "
    "import sys; sys.path[:0] = [{root!r}]; "
    "from pymilterkit.__main__ import fresh_worker; fresh_worker()"
)


def class_target(cls: type) -> str:
    """`module:Qualname` if a fresh interpreter imports `cls` by its module name, else
    `/path/to/file.py:Qualname` (a script's `__main__`, a file loaded by path)."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if cls.__module__ != "__main__":
        try:
            found = importlib.util.find_spec(cls.__module__)
        except (ImportError, ValueError):
            found = None
        if found is not None and (path is None or found.origin == path):
            return f"{cls.__module__}:{cls.__qualname__}"
    if path is None:
        raise ValueError(f"{cls.__qualname__} comes from no importable module or file")
    return f"{os.path.abspath(path)}:{cls.__qualname__}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to start a fresh worker of this run: the command line to parse again (`argv`), or
    the session class and the options."""

    session_class: type
    options: RunOptions
    argv: list[str] | None

    @property
    def config_path(self) -> str | None:
        """The config file the command line names (`--config FILE` or `--config=FILE`)."""
        argv = self.argv or []
        for i, arg in enumerate(argv):
            if arg == "--config" and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith("--config="):
                return arg.partition("=")[2]
        return None

    def spawn(self, fd: int, slot: int, control: int, cpus: set[int] | None) -> int:
        """Start a fresh worker process serving as `slot` on `fd`, confined to `cpus` (the
        supervisor's plan); returns its pid."""
        description: dict[str, Any] = {
            "fd": fd,
            "slot": slot,
            "cpus": None if cpus is None else sorted(cpus),
            "control": control,
            "parent": os.getpid(),
            "path": sys.path,
            "cwd": os.getcwd(),
            "log_level": logging.getLogger("pymilterkit").getEffectiveLevel(),
            "logging": _logging.settings(),  # None: the command did not set logging up
            "metrics": _metrics.fresh_worker(),  # None without metrics
        }
        if self.argv is not None:  # parse the command line (and its config file) again
            description["argv"] = self.argv
        else:
            description["target"] = class_target(self.session_class)
            try:
                description["options"] = pickle.dumps(self.options).hex()
            except Exception as exc:
                raise OSError(f"the run's options cannot be passed on: {exc}") from exc
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env[ENV] = json.dumps(description)
        # The words after the code are sys.argv[1:] there: `ps aux` shows whose worker it is.
        title = [f"pymilterkit-worker:{slot + 1}", class_target(self.session_class)]
        if self.config_path is not None:
            title.append(self.config_path)
        keep = {fd, control}
        if description["metrics"] is not None:  # "fd:row:rows": the counts' memory file
            keep.add(int(description["metrics"].split(":")[0]))
        boot = _BOOT.format(root=root, keep=sorted(keep))
        argv = [sys.executable, "-c", boot, *title]
        # The stop signals start blocked (the mask survives exec): one that comes while the
        # new interpreter imports waits for its handlers (`_signals.handled`) instead of
        # killing it.
        return os.posix_spawn(sys.executable, argv, env, setsigmask=HANDLED_SIGNALS)
