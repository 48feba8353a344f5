"""Process resource limits a milter needs: enough file descriptors for its connections.

Why: every MTA connection costs the milter one descriptor. systemd's default soft limit is
1,024; past it libmilter's `accept()` fails with EMFILE and its listener retries at once, in a
loop, while good clients time out. The hard limit is what the administrator allows, so at start
the soft limit is raised to it (unprivileged, always permitted).
"""

from __future__ import annotations

import logging
import resource

__all__ = ["raise_nofile_limit"]

logger = logging.getLogger("pymilterkit")


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def raise_nofile_limit() -> None:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit and log old -> new at INFO.

    A failure (a platform or sandbox that refuses it) is logged as a warning, never raised:
    the milter still runs, with the limit it was given.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        logger.info("open files limit %s (already the hard limit)", _show(soft))
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        logger.warning(
            "could not raise the open files limit %s to the hard limit %s: %s",
            _show(soft), _show(hard), exc,
        )
        return
    logger.info("open files limit raised %s -> %s (the hard limit)", _show(soft), _show(hard))
