"""Process names an admin can tell apart: the role and the filter in `ps`, `top` and `pgrep`.

Each serving process writes its name to `/proc/self/comm` (what `ps -o comm`, `top` and
`pgrep` show; 15 bytes): `sup NAME` for the supervisor, `wN NAME` for worker N, `drain NAME`
once a process drains (a stop or a reload's retirement). A reload's fresh workers also carry
it in their command line (`ps aux`), with the config file. No dependency and no C call; on a
system without `/proc` nothing happens.
"""

from __future__ import annotations

import contextlib

__all__ = ["role", "set_title"]


def role(slot: int | None) -> str:
    """The role word of a serving process: `sup` (alone or supervising), or `wN`."""
    return "sup" if slot is None else f"w{slot + 1}"


def set_title(role_word: str, name: str) -> None:
    """Name this process `ROLE NAME` (cut to the kernel's 15 bytes)."""
    title = f"{role_word} {name}".encode("utf-8", "replace")[:15]
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as comm:
        comm.write(title)
