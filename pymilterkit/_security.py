"""Unix socket creation with its mode and group, and privilege dropping, for the runner.

Anyone who can connect to a milter's socket can talk to it as if they were the MTA, so a unix
socket is created owner-and-group only (`DEFAULT_SOCKET_MODE`, 0o660) unless `socket_mode` says
otherwise. The socket's directory may be writable by someone else (the milter's own user, in the
documented setup), who could swap the fresh socket for a symlink between bind() and a chmod by
path. So the socket is bound inside a private directory that only this process can write, its
group and mode are set there, and only then is it renamed into place: no path anybody else can
change is ever followed while root works on it.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import secrets
import socket
import stat
from collections.abc import Iterable

from ._errors import ConfigurationError, SocketSpecError

logger = logging.getLogger("pymilterkit")

__all__ = [
    "DEFAULT_SOCKET_MODE",
    "UnixSocketFile",
    "bind_unix_socket",
    "check_can_drop_privileges",
    "drop_privileges",
    "unreadable",
]

DEFAULT_SOCKET_MODE = 0o660
"""Mode of a unix socket when none is given: the owner and the socket's group may connect."""


def _is_id(text: str) -> bool:
    """An id as chown takes one: ASCII digits, in the 32-bit range of uid_t/gid_t."""
    return text.isascii() and text.isdecimal() and int(text) < 2**32 - 1


def _gid(group: str | int) -> int:
    """A group by name or id; all digits and no such name: the id (as chown reads it)."""
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if _is_id(group):
            return int(group)
        raise ConfigurationError(f"unknown group {group!r}") from None


def _uid(user: str | int) -> tuple[int, int]:
    """A user's uid and primary gid, by name or id (all digits and no such name: the id)."""
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        if isinstance(user, str) and _is_id(user):
            return _uid(int(user))
        raise ConfigurationError(f"unknown user {user!r}") from None
    return entry.pw_uid, entry.pw_gid


class UnixSocketFile:
    """The socket file a run created: removed at stop only if it is still the same file."""

    def __init__(
        self, directory_fd: int, name: str, identity: tuple[int, int], path: str = ""
    ) -> None:
        self._dir_fd = directory_fd
        self._name = name
        self._identity = identity
        self._path = path or name

    def remove(self) -> None:
        """Unlink the socket unless someone replaced it since; never follows a link. If it
        cannot (a user that may not write the directory, after `--user`), say so."""
        if self._dir_fd < 0:
            return
        try:
            st = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._identity and stat.S_ISSOCK(st.st_mode):
                os.unlink(self._name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning(
                "socket file %s left in place: %s (the user it runs as may not write its "
                "directory; a directory that user owns avoids this)", self._path, exc.strerror,
            )
        self.close()

    def close(self) -> None:
        """Forget the directory (a pre-forked worker leaves the file to its parent)."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def _private_directory(parent_fd: int, name: str) -> tuple[str, int]:
    """Create and open a directory only this process's user can write, next to the socket."""
    for _ in range(8):
        private = f".{name}.{secrets.token_hex(6)}"
        try:
            os.mkdir(private, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            continue
        try:
            fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError:
            continue  # renamed away or replaced by a link: try a fresh name
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0:
            return private, fd
        os.close(fd)  # someone else's directory under our name
    raise SocketSpecError("could not create a private directory for the unix socket")


def _bind_in(sock: socket.socket, directory_fd: int) -> None:
    via_proc = f"/proc/self/fd/{directory_fd}"
    if os.path.isdir(via_proc):
        sock.bind(f"{via_proc}/s")
        return
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)  # no /proc: bind relative to the dir
    try:
        os.fchdir(directory_fd)
        sock.bind("s")
    finally:
        os.fchdir(here)
        os.close(here)


def bind_unix_socket(
    sock: socket.socket,
    path: str,
    mode: int | None,
    group: str | int | None,
    owner: str | int | None = None,
) -> UnixSocketFile:
    """Bind `sock` at `path` with `mode` (None: `DEFAULT_SOCKET_MODE`), `group` and `owner`.

    The socket appears at `path` already with its mode, group and owner, replacing a stale
    socket there atomically; nothing is done through a path that someone else can redirect.
    `owner` is the user the milter will run as (`--user`): it can then reach its own socket
    (the stop's wake-up connection) whatever the group.
    """
    wanted = DEFAULT_SOCKET_MODE if mode is None else mode
    gid = -1 if group is None else _gid(group)
    uid = -1 if owner is None else _uid(owner)[0]
    directory, name = os.path.split(path)
    parent_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        private, private_fd = _private_directory(parent_fd, name)
        try:
            _bind_in(sock, private_fd)
            # Nobody else can create or swap entries in the private directory.
            if (uid, gid) != (-1, -1):
                os.chown("s", uid, gid, dir_fd=private_fd, follow_symlinks=False)
            os.chmod("s", wanted, dir_fd=private_fd)
            st = os.stat("s", dir_fd=private_fd, follow_symlinks=False)
            os.rename("s", name, src_dir_fd=private_fd, dst_dir_fd=parent_fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink("s", dir_fd=private_fd)
            os.close(private_fd)
            with contextlib.suppress(OSError):
                os.rmdir(private, dir_fd=parent_fd)
    except BaseException:
        os.close(parent_fd)
        raise
    return UnixSocketFile(parent_fd, name, (st.st_dev, st.st_ino), path)


def check_can_drop_privileges(user: str | int | None, group: str | int | None) -> None:
    """Refuse `user`/`group` that cannot be switched to, before anything is created."""
    if user is None and group is None:
        return
    if os.geteuid() != 0:
        raise ConfigurationError("dropping privileges (user/group) needs to start as root")
    if group is not None:
        _gid(group)
    if user is not None:
        _uid(user)


def drop_privileges(user: str | int | None, group: str | int | None) -> None:
    """Switch to `user` (and `group`, else the user's primary group) for good."""
    check_can_drop_privileges(user, group)
    if user is None and group is None:
        return
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


def unreadable(paths: Iterable[str]) -> list[str]:
    """Which of `paths` this process cannot read (a directory: list and enter); missing ones
    are not reported. Run after `drop_privileges`: a reload's fresh workers and every module
    imported later read them as this user."""
    found: list[str] = []
    for path in dict.fromkeys(paths):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError:  # a parent directory it may not enter
            found.append(path)
            continue
        wanted = os.R_OK | os.X_OK if stat.S_ISDIR(mode) else os.R_OK
        if not os.access(path, wanted):
            found.append(path)
    return found
