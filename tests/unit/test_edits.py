"""Header edits: the actions computed from two header lists rebuild the edited list exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pymilterkit._edits import HeaderEdit, header_edits
from pymilterkit._flags import Status
from pymilterkit.testing._apply import apply_modifications
from pymilterkit.testing._results import (
    HeaderAdded,
    HeaderChanged,
    HeaderDeleted,
    HeaderInserted,
    MessageResult,
    Modification,
    Step,
)

Headers = list[tuple[str, str]]


def _modifications(edits: list[HeaderEdit]) -> tuple[Modification, ...]:
    mods: list[Modification] = []
    for e in edits:
        if e.kind == "change":
            mods.append(HeaderChanged(e.name, e.index, e.value))
        elif e.kind == "delete":
            mods.append(HeaderDeleted(e.name, e.index))
        elif e.kind == "insert":  # as `_whole` sends it: past the MTA's own Received:
            mods.append(HeaderInserted(e.index + 1, e.name, e.value))
        else:
            mods.append(HeaderAdded(e.name, e.value))
    return tuple(mods)


def _delivered(original: Headers, edits: list[HeaderEdit]) -> Headers:
    """Apply the edits as the MTA would (the harness's rules) and read the headers back."""
    head = "".join(f"{n}:{v}\r\n".replace("\n ", "\r\n ") for n, v in original)
    raw = head.encode() + b"\r\nbody\r\n"
    result = MessageResult(Status.CONTINUE, Step.EOM, None, _modifications(edits), (), ())
    out = apply_modifications(raw, result, leading_space=True).decode()
    headers: Headers = []
    for line in out.split("\r\n"):
        if not line:
            break
        if line[0] in " \t":  # a folded line continues the previous field
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        else:
            name, value = line.split(":", 1)
            headers.append((name, value))
    return headers


def test_no_change_gives_no_action() -> None:
    headers = [("From", " a@example.org"), ("To", " b@example.org"), ("Subject", " hi")]
    assert header_edits(headers, list(headers)) == []


def test_a_changed_value_is_one_change_at_its_per_name_index() -> None:
    original = [("Received", " one"), ("Received", " two"), ("Subject", " hi")]
    edited = [("Received", " one"), ("Received", " TWO"), ("Subject", " hi")]
    assert header_edits(original, edited) == [HeaderEdit("change", "Received", " TWO", 2)]


def test_deletions_run_from_the_last_header_up() -> None:
    original = [("X-A", " 1"), ("X-A", " 2"), ("X-A", " 3")]
    assert header_edits(original, [("X-A", " 2")]) == [
        HeaderEdit("delete", "X-A", "", 3),
        HeaderEdit("delete", "X-A", "", 1),
    ]


def test_a_header_at_the_end_is_added_and_one_before_it_inserted() -> None:
    original = [("From", " a"), ("Subject", " s")]
    edited = [("X-First", " f"), ("From", " a"), ("Subject", " s"), ("X-Last", " l")]
    assert header_edits(original, edited) == [
        HeaderEdit("insert", "X-First", " f", 0),
        HeaderEdit("add", "X-Last", " l", 0),
    ]


def test_names_compare_without_case() -> None:
    original = [("subject", " s")]
    assert header_edits(original, [("Subject", " s")]) == []
    assert header_edits(original, [("SUBJECT", " t")]) == [
        HeaderEdit("change", "subject", " t", 1)
    ]


_names = st.sampled_from(["From", "To", "Subject", "Received", "X-A", "x-a"])
_values = st.sampled_from([" 1", " 2", " 3", " a b", "\tfolded\n next"])
_header_lists = st.lists(st.tuples(_names, _values), max_size=8)


@settings(max_examples=400, deadline=None)
@given(original=_header_lists, data=st.data())
def test_applying_the_edits_gives_the_edited_headers(
    original: Headers, data: st.DataObject
) -> None:
    # An edit a filter could make: keep a subsequence (some changed), with new ones put in.
    kept = [h for h in original if data.draw(st.booleans())]
    kept = [(n, data.draw(_values)) if data.draw(st.booleans()) else (n, v) for n, v in kept]
    edited = list(kept)
    for _ in range(data.draw(st.integers(0, 3))):
        new = (data.draw(_names), data.draw(_values))
        edited.insert(data.draw(st.integers(0, len(edited))), new)
    edits = header_edits(original, edited)
    delivered = _delivered(original, edits)
    assert [(n.lower(), v) for n, v in delivered] == [(n.lower(), v) for n, v in edited]
    # never more actions than rewriting every differing header from scratch
    assert len(edits) <= len(original) + len(edited)
