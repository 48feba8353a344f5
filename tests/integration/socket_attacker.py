"""A hostile local user racing the milter's start (run as an unprivileged user by the tests).

    python socket_attacker.py DIR VICTIM SECONDS STOPFILE   (started as root: it becomes nobody)

It owns DIR, the directory of the milter's unix socket, as the documented setup gives the
milter's own user such a directory. As fast as it can, it swaps whatever root creates there:
a socket is renamed away and replaced by a symlink to VICTIM; a directory is renamed away and
replaced by one of its own whose entries are symlinks to VICTIM. If root then changes the
mode or group "of the socket" through a path, it changes VICTIM instead.

It prints "ready" once it races (after dropping to nobody), the number of swaps so far at each
25th, and the number of swaps it made when it ends (after SECONDS, or once STOPFILE exists).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
import time


def main() -> None:
    directory, victim, seconds, stop_file = sys.argv[1:5]
    if os.getuid() == 0:  # the interpreter may sit where nobody cannot run it: drop here
        os.setgroups([])
        os.setgid(grp.getgrnam("nogroup").gr_gid)
        os.setuid(pwd.getpwnam("nobody").pw_uid)
    deadline = time.monotonic() + float(seconds)
    me = os.getuid()
    print("ready", flush=True)  # the test starts its side only now
    swaps = 0
    loops = 0
    while time.monotonic() < deadline:
        loops += 1
        if loops % 256 == 0 and os.path.exists(stop_file):
            break
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_uid == me or name.endswith(".moved"):
                continue
            try:
                if stat.S_ISSOCK(st.st_mode):
                    os.rename(path, path + ".moved")
                    os.symlink(victim, path)
                    swaps += 1
                    if swaps % 25 == 0:
                        print(swaps, flush=True)  # progress, for a test that waits for it
                elif stat.S_ISDIR(st.st_mode):
                    os.rename(path, path + ".moved")
                    os.mkdir(path, 0o777)
                    for inner in ("s", "m.sock", "sock"):
                        os.symlink(victim, os.path.join(path, inner))
                    swaps += 1
            except OSError:
                pass
    print(swaps, flush=True)


if __name__ == "__main__":
    main()
