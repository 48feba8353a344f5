"""Socket permissions and privilege dropping for the runner.

Anyone who can connect to a milter's socket can talk to it as if they were the MTA, so a unix
socket is created owner-and-group only (`DEFAULT_SOCKET_MODE`, 0o660) unless `socket_mode` says
otherwise: libmilter would leave whatever the umask gives, often world-connectable. The mode is
already right when the socket appears (the umask is narrowed around its creation), not only
after a chmod, so no client can slip in between.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from collections.abc import Iterator

from ._errors import ConfigurationError

__all__ = [
    "DEFAULT_SOCKET_MODE",
    "apply_socket_permissions",
    "drop_privileges",
    "socket_creation_umask",
]

DEFAULT_SOCKET_MODE = 0o660
"""Mode of a unix socket when none is given: the owner and the socket's group may connect."""


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigurationError(f"unknown group {group!r}") from None


def _uid(user: str | int) -> tuple[int, int]:
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise ConfigurationError(f"unknown user {user!r}") from None
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def socket_creation_umask(mode: int | None) -> Iterator[None]:
    """Narrow the umask while a unix socket is created so it never has more than `mode`.

    Used at start-up only, before any thread of the milter runs (the umask is per process).
    """
    wanted = DEFAULT_SOCKET_MODE if mode is None else mode
    previous = os.umask(0)
    os.umask(previous | (0o777 & ~wanted))
    try:
        yield
    finally:
        os.umask(previous)


def apply_socket_permissions(path: str, mode: int | None, group: str | int | None) -> None:
    """chgrp/chmod a freshly created unix socket; `mode` None means `DEFAULT_SOCKET_MODE`."""
    if group is not None:
        os.chown(path, -1, _gid(group))
    os.chmod(path, DEFAULT_SOCKET_MODE if mode is None else mode)


def drop_privileges(user: str | int | None, group: str | int | None) -> None:
    """Switch to `user` (and `group`, else the user's primary group) for good."""
    if user is None and group is None:
        return
    if os.geteuid() != 0:
        raise ConfigurationError("dropping privileges (user/group) needs to start as root")
    gid = _gid(group) if group is not None else None
    if user is not None:
        uid, primary = _uid(user)
        gid = primary if gid is None else gid
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    elif gid is not None:
        os.setgroups([])
        os.setgid(gid)
