"""A tiny filter on pymilter (sdgathman/pymilter), to check the client against a foreign milter.

    python3 pymilter_filter.py unix:/path/to/sock

Rejects senders containing "bad" with a custom reply, counts recipients, and at end of message
adds X-Pymilter-Rcpts, changes Subject and replaces the body.
"""

from __future__ import annotations

import sys

import Milter  # type: ignore[import-not-found, import-untyped, unused-ignore]


class CountingFilter(Milter.Base):  # type: ignore[misc, unused-ignore]
    def __init__(self) -> None:
        self.count = 0
        self.subject = ""

    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.count = 0
        if "bad" in mailfrom:
            self.setreply("550", "5.7.1", "pymilter says no")
            return Milter.REJECT  # type: ignore[no-any-return]
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envrcpt(self, to: str, *params: str) -> int:
        self.count += 1
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def header(self, name: str, value: str) -> int:
        if name.lower() == "subject":
            self.subject = value
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        self.addheader("X-Pymilter-Rcpts", str(self.count))
        self.chgheader("Subject", 1, f"[seen] {self.subject}")
        self.replacebody(b"replaced by pymilter\r\n")
        return Milter.ACCEPT  # type: ignore[no-any-return]


def main() -> None:
    Milter.factory = CountingFilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY)
    Milter.runmilter("pmk-foreign", sys.argv[1], 60)


if __name__ == "__main__":
    main()
