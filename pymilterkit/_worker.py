"""The body of a fresh worker process (started by `_fresh.Recipe.spawn` at reload).

It imports the session class afresh by the name the supervisor gave (see `_fresh`), builds the
same `Milter` and serves as one worker on the inherited listening descriptor.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys

from . import _metrics
from ._fresh import ENV
from ._prefork import plan_cpus, serve_worker
from ._serve import Server

__all__ = ["main"]


def main() -> None:
    """The fresh worker: import the session class, then serve (never returns)."""
    description = json.loads(os.environ.pop(ENV))
    sys.path[:] = description["path"]
    cwd = description.get("cwd")
    if cwd:
        os.chdir(cwd)
    if "argv" not in description:  # the command line sets logging up itself
        logging.basicConfig(
            level=description.get("log_level", logging.INFO),
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
    slot = description["slot"]

    def server() -> Server:
        from ._cli import load_session_class, milter_for_reload
        from ._runner import Milter, claim_run

        _metrics.attach(description.get("metrics"))  # the supervisor's counts, if metered
        if "argv" in description:
            milter = milter_for_reload(description["argv"])
        else:
            options = pickle.loads(bytes.fromhex(description["options"]))
            session_class = load_session_class(description["target"])
            milter = Milter(session_class, options.socket, **options.keywords())
        claim_run(milter)
        cpus = plan_cpus(milter.options)
        return milter.filter().server(slot, None if cpus is None else cpus[slot])

    serve_worker(server, description["fd"], description["control"], description["parent"])

