"""Process names an admin can tell apart: the role and the filter in `ps`, `top` and `pgrep`.

Each serving process names itself (what `/proc/PID/comm`, `ps -o comm`, `top` and `pgrep`
show; 15 bytes): `sup NAME` for the supervisor, `wN NAME` for worker N, `drain NAME` once a
process drains (a stop or a reload's retirement). The main thread names itself with
prctl(PR_SET_NAME), which works after `--user` dropped privileges (the process's
`/proc/self/comm` is root's then); another thread writes `/proc/self/comm`. A reload's fresh
workers also carry the name in their command line (`ps aux`), with the config file. Where
neither works, nothing happens.
"""

from __future__ import annotations

import contextlib
import threading

from ._libmilter import set_thread_name

__all__ = ["role", "set_title"]


def role(slot: int | None) -> str:
    """The role word of a serving process: `sup` (alone or supervising), or `wN`."""
    return "sup" if slot is None else f"w{slot + 1}"


def set_title(role_word: str, name: str) -> None:
    """Name this process `ROLE NAME` (cut to the kernel's 15 bytes)."""
    title = f"{role_word} {name}".encode("utf-8", "replace")[:15]
    # The process's name is its main thread's: prctl names the calling thread only.
    if threading.current_thread() is threading.main_thread() and set_thread_name(title):
        return
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as comm:
        comm.write(title)
