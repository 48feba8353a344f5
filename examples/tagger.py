"""A header-based tagger: tags messages whose Subject or From match rules.

For every message it collects the headers (`on_header`), matches each rule's pattern against
the decoded header value, and at end of message (`on_eom`):

* removes any `X-Tag` header the message arrived with (a sender cannot pre-tag its own mail),
* adds `X-Tag: <tag>, <tag>` with the tags of every matching rule, in rule order,
* prefixes the Subject with `[<prefix>] ` for matching rules that have a prefix (once: a
  Subject that already starts with the prefix is left alone).

Change `RULES` (or subclass `Tagger` and set `rules`) to tag what matters to you.

Run it:  pymilterkit run examples.tagger:Tagger --socket unix:/tmp/tagger.sock
or:      python examples/tagger.py [SOCKET]
"""

from __future__ import annotations

import email.policy
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from typing_extensions import override

from pymilterkit import Actions, EsmtpParams, Milter, MilterSession, Status

TAG_HEADER = "X-Tag"


@dataclass(frozen=True)
class Rule:
    """Tag a message with `tag` when header `header` matches `pattern` (re.search)."""

    header: str
    pattern: re.Pattern[str]
    tag: str
    subject_prefix: str | None = None
    """If set, the Subject also gets `[subject_prefix] ` in front."""


RULES: tuple[Rule, ...] = (
    Rule("Subject", re.compile(r"(?i)\b(invoice|payment|receipt)s?\b"), "finance"),
    Rule("From", re.compile(r"(?i)@partner\.example\.(com|net)>?$"), "partner"),
    Rule("Subject", re.compile(r"(?i)\burgent\b"), "urgent", subject_prefix="URGENT"),
)


def decoded(name: str, value: str) -> str:
    """A header value as a reader sees it: RFC 2047 encoded words decoded, lines unfolded."""
    try:
        return str(email.policy.default.header_factory(name, unfold(value)))
    except Exception:  # noqa: BLE001 -- a malformed header: match its raw text instead
        return unfold(value)


def unfold(value: str) -> str:
    """Join folded header lines (Postfix hands them over as `\\n` + white space)."""
    return re.sub(r"\r?\n(?=[ \t])", "", value)


class Tagger(MilterSession):
    """Adds `X-Tag` (and a Subject prefix) to messages that match `rules`."""

    actions = Actions.ADD_HEADER | Actions.CHANGE_HEADER
    rules: ClassVar[Sequence[Rule]] = RULES

    @override
    def on_mail(self, sender: str, params: EsmtpParams) -> Status:
        self.headers: list[tuple[str, str]] = []  # message-scoped: reset at each MAIL FROM
        return Status.CONTINUE

    @override
    def on_header(self, name: str, value: str) -> Status:
        self.headers.append((name, value))
        return Status.CONTINUE

    def tags(self) -> list[tuple[str, str | None]]:
        """(tag, subject prefix) of every rule that matches, without duplicate tags."""
        found: dict[str, str | None] = {}
        for rule in self.rules:
            for name, value in self.headers:
                if name.lower() == rule.header.lower() and rule.pattern.search(
                    decoded(name, value)
                ):
                    if rule.tag not in found or found[rule.tag] is None:
                        found[rule.tag] = rule.subject_prefix
                    break
        return list(found.items())

    @override
    def on_eom(self) -> Status:
        # Remove tags that came from outside: last first, so the indexes stay valid.
        existing = sum(1 for name, _ in self.headers if name.lower() == TAG_HEADER.lower())
        for index in range(existing, 0, -1):
            self.change_header(TAG_HEADER, None, index)

        tags = self.tags()
        if not tags:
            return Status.CONTINUE
        self.add_header(TAG_HEADER, ", ".join(tag for tag, _ in tags))

        subject = next((v for n, v in self.headers if n.lower() == "subject"), None)
        if subject is not None:
            new_subject = unfold(subject)
            for _, prefix in reversed(tags):
                if prefix is not None and not decoded("Subject", new_subject).startswith(
                    f"[{prefix}]"
                ):
                    new_subject = f"[{prefix}] {new_subject}"
            if new_subject != unfold(subject):
                self.change_header("Subject", new_subject)
        return Status.CONTINUE


if __name__ == "__main__":
    socket = sys.argv[1] if len(sys.argv) > 1 else "inet:3000@localhost"
    Milter(Tagger, socket, name="Tagger").run()
