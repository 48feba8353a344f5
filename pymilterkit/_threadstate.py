"""Interpreter thread states of libmilter's worker threads: kept across callbacks, freed after.

ctypes gives a thread Python did not start a fresh thread state for every callback; pinning
keeps one per libmilter worker, and the runner frees those of workers that have ended. This is
the only module that manages thread states; the C API functions it calls are declared in
`_libmilter`, with every other ctypes declaration of what a library promises.

CPython behaviour relied on, 3.11 through 3.14 (tests/unit/test_foreign_internals.py runs it on
a thread the C library starts, and fails if it changes):

- a ctypes callback on a foreign thread creates a thread state with PyGILState_Ensure and
  deletes it on return unless the count of Ensure calls is still above zero; one extra
  PyGILState_Ensure keeps it (and the thread's `threading.local` data) for later callbacks,
  while ctypes' own PyGILState_Release still releases the GIL between them;
- the state of an ended thread stays in the interpreter's list (PyInterpreterState_ThreadHead,
  PyThreadState_Next) until PyThreadState_Clear and PyThreadState_Delete, called with the GIL
  from another thread, free it (3.14 moves the ended thread's asyncio tasks to the
  interpreter's list there).

If a CPython stopped deleting the state itself, pinning would only cost one extra Ensure; if it
began to free a pinned state at thread exit, `release_exited_thread_states` would free it twice:
the test checks the state is still counted after its thread ended.
"""

from __future__ import annotations

import os
import threading

from ._libmilter import python_api

__all__ = ["pin_thread_state", "pins", "release_exited_thread_states", "thread_state_count"]

pins = threading.local()
"""Set on a thread state once it is pinned: per thread state, not per thread id, because
libmilter's pool ends idle workers and a new thread often gets the id of an ended one."""
_pinned_states: dict[int, int] = {}  # PyThreadState address -> the OS thread's native id


def pin_thread_state() -> None:
    """Keep this foreign thread's Python thread state alive across callbacks.

    ctypes creates and destroys a thread state on every callback from a thread Python did not
    start (libmilter's workers), with a fresh 16 KiB frame stack (mmap/munmap) each time; one
    extra PyGILState_Ensure, never released, keeps it. The GIL is still released between
    callbacks. `release_exited_thread_states` frees it once the thread has ended.
    """
    if not pins.__dict__:  # the trampolines test this inline first: it runs per callback
        pins.pinned = True
        python_api.PyGILState_Ensure()
        _pinned_states[python_api.PyThreadState_Get()] = threading.get_native_id()


def release_exited_thread_states() -> int:
    """Free the pinned thread states of OS threads that have ended; returns how many.

    libmilter ends and starts pool workers as load changes; without this, each ended worker
    would leave its thread state (and frame stack) behind. Needs the GIL; Linux only (/proc).
    """
    if not os.path.isdir("/proc/self/task"):
        return 0
    released = 0
    for state, tid in list(_pinned_states.items()):
        if not os.path.exists(f"/proc/self/task/{tid}"):
            del _pinned_states[state]
            python_api.PyThreadState_Clear(state)
            python_api.PyThreadState_Delete(state)
            released += 1
    return released


def thread_state_count() -> int:
    """How many Python thread states this interpreter holds (for leak checks)."""
    count = 0
    state = python_api.PyInterpreterState_ThreadHead(python_api.PyInterpreterState_Get())
    while state:
        count += 1
        state = python_api.PyThreadState_Next(state)
    return count
