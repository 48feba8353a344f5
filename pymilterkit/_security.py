"""Socket permissions and privilege dropping for the runner."""

from __future__ import annotations

import grp
import os
import pwd

from ._errors import ConfigurationError

__all__ = ["apply_socket_permissions", "drop_privileges"]


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


def apply_socket_permissions(path: str, mode: int | None, group: str | int | None) -> None:
    """chmod/chgrp a freshly opened unix socket (libmilter leaves the umask's mode)."""
    if group is not None:
        os.chown(path, -1, _gid(group))
    if mode is not None:
        os.chmod(path, mode)


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
