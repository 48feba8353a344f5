"""The runner's callbacks class, with metrics and dry-run chosen when the run is built.

With neither, it is `LibmilterCallbacks` itself: features that are off cost nothing per call.
"""

from __future__ import annotations

from ._dryrun import DryRunRules
from ._metrics import MeteredRules
from ._trampolines import LibmilterCallbacks

__all__ = ["callbacks_class"]


class _DryRunCallbacks(DryRunRules, LibmilterCallbacks):
    def close_all(self, grace: float = 0.0) -> int:
        count = super().close_all(grace)
        self.dry_run_summary()
        return count


class _MeteredCallbacks(MeteredRules, LibmilterCallbacks):
    pass


class _MeteredDryRunCallbacks(MeteredRules, _DryRunCallbacks):
    # Metrics outside dry-run: they count what the MTA was sent (CONTINUE), dry-run counts
    # what the filter answered.
    pass


def callbacks_class(*, metrics: bool, dry_run: bool) -> type[LibmilterCallbacks]:
    """`LibmilterCallbacks`, or a subclass that also meters and/or runs dry."""
    if metrics:
        return _MeteredDryRunCallbacks if dry_run else _MeteredCallbacks
    return _DryRunCallbacks if dry_run else LibmilterCallbacks
