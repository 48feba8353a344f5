"""The fewest header actions that turn the headers the MTA has into the headers a filter wants.

Whole-message filters edit a parsed message; the MTA only takes header actions at end of
message: change or delete the Nth header of a name, insert at a position, add at the end. This
module compares the two header lists and answers with those actions, in an order whose indexes
hold however the MTA counts: changes and deletions from the last header up (a deletion never
shifts the index of one still to come, whether or not the MTA keeps counting deleted headers),
then insertions from the first position down to the end, where they become additions.

Headers are compared by name (case-insensitive) and exact value. Unchanged headers are matched
in order (`difflib.SequenceMatcher`: the longest matching runs, no junk heuristics), and within a
run of differences a header of the same name becomes a change rather than a deletion and an
insertion. Pure functions: no libmilter, no I/O.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Literal

__all__ = ["HeaderEdit", "header_edits"]

EditKind = Literal["change", "delete", "insert", "add"]


@dataclasses.dataclass(frozen=True, slots=True)
class HeaderEdit:
    """One header action: what libmilter's smfi_chgheader/insheader/addheader take.

    `index` is the 1-based index among headers of that name for "change" and "delete", the
    0-based position in the header block for "insert", and 0 for "add"; `value` is empty for
    "delete".
    """

    kind: EditKind
    name: str
    value: str
    index: int


def _key(header: tuple[str, str]) -> tuple[str, str]:
    return header[0].lower(), header[1]


def _pair_by_name(
    old: Sequence[tuple[str, str]], new: Sequence[tuple[str, str]]
) -> Sequence[tuple[str, int, int, int, int]]:
    """Opcodes over two runs of differing headers, matching by name only (order kept)."""
    matcher = difflib.SequenceMatcher(
        None, [h[0].lower() for h in old], [h[0].lower() for h in new], autojunk=False
    )
    return matcher.get_opcodes()


def header_edits(
    original: Sequence[tuple[str, str]], edited: Sequence[tuple[str, str]]
) -> list[HeaderEdit]:
    """The actions that make `original` (as the MTA has it) into `edited`, fewest first.

    Both are sequences of `(name, value)` in header order; a value is compared exactly as
    given (render new values for the wire before calling). An empty list means no change.
    """
    kept = len(original)
    if edited[:kept] == original or [_key(h) for h in edited[:kept]] == [
        _key(h) for h in original
    ]:  # the usual case, headers only added at the end: no matching needed
        return [HeaderEdit("add", name, value, 0) for name, value in edited[kept:]]
    changed: dict[int, str] = {}  # original position -> new value
    deleted: list[int] = []  # original positions
    inserted: list[int] = []  # edited positions
    outer = difflib.SequenceMatcher(
        None, [_key(h) for h in original], [_key(h) for h in edited], autojunk=False
    )
    for tag, o1, o2, e1, e2 in outer.get_opcodes():
        if tag == "equal":
            continue
        for inner, a1, a2, b1, b2 in _pair_by_name(original[o1:o2], edited[e1:e2]):
            if inner == "equal":
                for k in range(a2 - a1):
                    changed[o1 + a1 + k] = edited[e1 + b1 + k][1]
                continue
            deleted.extend(range(o1 + a1, o1 + a2))
            inserted.extend(range(e1 + b1, e1 + b2))

    edits: list[HeaderEdit] = []
    for position in sorted([*changed, *deleted], reverse=True):
        name = original[position][0]
        lowered = name.lower()
        index = sum(1 for h in original[: position + 1] if h[0].lower() == lowered)
        if position in changed:
            edits.append(HeaderEdit("change", name, changed[position], index))
        else:
            edits.append(HeaderEdit("delete", name, "", index))

    present = len(original) - len(deleted)
    for position in sorted(inserted):
        name, value = edited[position]
        if position >= present:
            edits.append(HeaderEdit("add", name, value, 0))
        else:
            edits.append(HeaderEdit("insert", name, value, position))
        present += 1
    return edits
