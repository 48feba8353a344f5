"""Value types handed to stage methods: client addresses and ESMTP parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv6Address

__all__ = ["EsmtpParams", "InetAddress", "UnixAddress", "decode"]


def decode(raw: bytes) -> str:
    """Decode bytes from the MTA; never fails, and encoding back gives the same bytes."""
    return raw.decode("utf-8", "surrogateescape")


@dataclasses.dataclass(frozen=True, slots=True)
class InetAddress:
    """An IPv4 or IPv6 client address with its port, as given to `on_connect`."""

    ip: IPv4Address | IPv6Address
    port: int

    def __str__(self) -> str:
        if isinstance(self.ip, IPv6Address):
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class UnixAddress:
    """A unix-domain client address (a socket path), as given to `on_connect`."""

    path: str

    def __str__(self) -> str:
        return self.path


class EsmtpParams(Mapping[str, "str | None"]):
    """ESMTP parameters of MAIL FROM / RCPT TO, read-only.

    Keys are upper-cased and looked up case-insensitively; the value is the text after `=`, or
    None for a bare keyword (`SMTPUTF8`). `str(params)` gives the original text back.
    """

    __slots__ = ("_args", "_map")

    def __init__(self, args: Iterable[str] = ()) -> None:
        self._args: tuple[str, ...] = tuple(args)
        self._map: dict[str, str | None] | None = None

    @classmethod
    def parse(cls, text: str) -> EsmtpParams:
        """Build from the text form, `"SIZE=100 BODY=8BITMIME"`."""
        return cls(text.split())

    def _lookup(self) -> dict[str, str | None]:
        # Built on first use: most filters never read the parameters.
        if self._map is None:
            parsed: dict[str, str | None] = {}
            for arg in self._args:
                key, sep, value = arg.partition("=")
                parsed[key.upper()] = value if sep else None
            self._map = parsed
        return self._map

    def __getitem__(self, key: str) -> str | None:
        return self._lookup()[key.upper()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self._lookup()

    def __iter__(self) -> Iterator[str]:
        return iter(self._lookup())

    def __len__(self) -> int:
        return len(self._lookup())

    def __str__(self) -> str:
        return " ".join(self._args)

    def __repr__(self) -> str:
        return f"EsmtpParams({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EsmtpParams):
            return self._args == other._args
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(self._args)

    @property
    def args(self) -> tuple[str, ...]:
        """The parameters as the MTA sent them, one string each."""
        return self._args
