"""Test your filter: an in-process harness, an MTA-side client, and a milter process runner."""

from __future__ import annotations

from ._process import MilterProcess

__all__ = ["MilterProcess"]
