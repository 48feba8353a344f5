"""libmilter's private internals: the context's layout, its writer, and its stack frame.

Everything here depends on what libmilter never promised, so it is kept apart from the public
bindings (`_libmilter`): the layout of `struct smfi_str` of libmilter 1.0.1 (sendmail
8.14-8.18) on LP64, `mi_wr_cmd` and the `ctx_reply` it frees, `mi_engine`'s `genarg`,
`mi_listener`. It buys:

- bounded macro reads: smfi_getsymval walks an odd-length macro list past its end (a segfault);
- the unknown command's exact bytes: libmilter hands over a packet without checking its NUL;
- late answers (`send_reply`): an `async def` stage answered after its callback returned, so
  the worker thread is free while the coroutine waits;
- serving without smfi_main's signal thread (`serve`), which would stop libmilter on a
  SIGHUP/SIGTERM the main thread could not take at once, abandoning the sessions in flight.

Nothing is used before `layout_known` has checked the layout on a live context; on any other
build each feature falls back, and one WARNING per process says which and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct
from typing import Any

from ._libmilter import MI_SUCCESS, Libmilter, handle, version
from ._protocol import REPLY_CLASS, REPLY_LETTER, REPLYCODE

__all__ = [
    "ST_ENDM",
    "can_answer_later",
    "ctx_macro",
    "ctx_macros",
    "ctx_state",
    "hang_up",
    "layout_known",
    "macro_key",
    "send_reply",
    "serve",
    "stage_macros",
    "unknown_command",
]

logger = logging.getLogger("pymilterkit")

# -- The layout and its check -------------------------------------------------------------------
#
# Offsets in `struct smfi_str` on LP64: ctx_id, ctx_sd, ctx_dbg, ctx_timeout, ctx_state,
# ctx_smfi, ctx_prot_vers, ctx_aflags, ctx_pflags, ctx_pflags2mta, ctx_prot_vers2mta, then
# ctx_mac_ptr[7] (char **, one per macro stage), ctx_mac_buf[7] (the packet each points into),
# ctx_mac_list[7], ctx_reply, ctx_privdata.
_CTX_SD = 8
_CTX_STATE = 24
_CTX_MAC_PTR = 80
_CTX_REPLY = 248
_CTX_PRIVDATA = 256
_MAX_MACROS_ENTRIES = 7
_KNOWN_VERSION = (1, 0, 1)
ST_ENDM = 10
"""engine.c's state of a context inside end of message (also while a body chunk it carried
runs)."""


class _Layout:
    """Whether contexts have the layout above: checked once per process, on the first one."""

    known: bool | None = None


def _layout_problem(ctx: int) -> str | None:
    """Why `ctx` does not have the layout above, or None if it has."""
    if ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(ctypes.c_long) != 8:
        return "not an LP64 platform"
    found = version()
    if found != _KNOWN_VERSION:
        return f"smfi_version() is {_dotted(found)}, not {_dotted(_KNOWN_VERSION)}"
    lib = handle()
    marker = ctypes.c_char()
    address = ctypes.addressof(marker)
    if lib.smfi_setpriv(ctx, address) != MI_SUCCESS:
        return "smfi_setpriv failed"
    try:
        seen = ctypes.c_void_p.from_address(ctx + _CTX_PRIVDATA).value
    finally:
        lib.smfi_setpriv(ctx, None)  # pymilterkit keeps no private data (mi_clr_ctx checks)
    if seen != address:
        return f"smfi_setpriv's pointer is not at offset {_CTX_PRIVDATA} of the context"
    return None


def layout_known(ctx: int) -> bool:
    """Whether contexts can be read directly (checked once per process, on `ctx`).

    When not, logs the one WARNING that says what falls back and why.
    """
    known = _Layout.known
    if known is None:
        problem = _layout_problem(ctx)
        known = _Layout.known = problem is None
        if problem is not None:
            _warn_fallback(problem)
    return known


def _warn_fallback(why: str) -> None:
    logger.warning(
        "libmilter's context layout is not the one pymilterkit knows (libmilter_version() %s, "
        "layout check: %s); these features fall back: late answers (a suspended async stage "
        "holds its libmilter thread until it is answered), bounded macro reads (macros come "
        "from smfi_getsymval, which a malformed macro packet can crash), exact unknown "
        "commands (bounded by the packet's allocation only)",
        _dotted(version()),
        why,
    )


def _dotted(numbers: tuple[int, ...]) -> str:
    return ".".join(map(str, numbers))


# -- C library helpers (glibc, musl): what bounds a read to its allocation, and frees it ------

_libc = ctypes.CDLL(None)
# size_t malloc_usable_size(void *)
# Called with the GIL held (PyDLL): it never blocks, and releasing the GIL in a stage callback
# hands it to another of libmilter's threads, which this one then waits for.
_usable_size: Any = getattr(ctypes.PyDLL(None), "malloc_usable_size", None)
if _usable_size is not None:
    _usable_size.argtypes = [ctypes.c_void_p]
    _usable_size.restype = ctypes.c_size_t
# void free(void *)
_free = _libc.free
_free.argtypes = [ctypes.c_void_p]
_free.restype = None
_char_pp = ctypes.POINTER(ctypes.c_char_p)


# -- A context's macros, read without over-reading ----------------------------------------------
#
# smfi_getsymval steps over name/value pairs two pointers at a time; a macro packet with an odd
# number of strings (an MTA stand-in can send one) makes it step past the array's NULL and
# strcmp garbage: a segfault. So pymilterkit reads the macro arrays itself: smfi_getsymval
# answers only when every array holds pairs, otherwise the lookup walks them here, bounded by
# the array's end and the packet's allocation.
_MAX_ARGV = 1 << 16  # a packet of at most 64 KiB has fewer strings than this


def _cstring(pointer: int, start: int, blob: bytes | None) -> bytes:
    """The NUL-terminated string at `pointer`; within `blob` (its allocation from `start`)."""
    if blob is None:
        return ctypes.string_at(pointer)
    offset = pointer - start
    end = blob.find(b"\0", offset)
    return blob[offset:] if end < 0 else blob[offset:end]


def _stage_macros(argv: int, buf: int) -> list[bytes]:
    """One stage's macro strings (names and values alternate), read up to the array's NULL."""
    strings: list[bytes] = []
    if _usable_size is None:  # no allocation sizes: the array's NULL still bounds the walk
        array = ctypes.cast(argv, _char_pp)
        for index in range(_MAX_ARGV):
            item = array[index]
            if item is None:
                break
            strings.append(item)
        return strings
    size = _usable_size(buf)
    blob = ctypes.string_at(buf, size)
    pointers = memoryview(ctypes.string_at(argv, _usable_size(argv) & ~7)).cast("Q")
    for pointer in pointers:
        offset = pointer - buf
        if not pointer or not 0 <= offset < size:
            break  # the array's end, or not into the packet: stop rather than read anywhere
        end = blob.find(b"\0", offset)
        strings.append(blob[offset:] if end < 0 else blob[offset:end])
    return strings


_SLOTS = ctypes.c_void_p * (2 * _MAX_MACROS_ENTRIES)  # ctx_mac_ptr[], then ctx_mac_buf[]
_POINTER_ARRAYS: dict[int, Any] = {}  # ctypes array types by length (at most ~4,100)
_STRING_ARRAYS: dict[int, Any] = {}  # the same, of C strings
_VIEWS: dict[int, Any] = {}  # a context's macro slots, by its address (at most _MAX_VIEWS)
_MAX_VIEWS = 4096


def _array(types: dict[int, Any], item: Any, size: int) -> Any:
    """The ctypes array type of `size` `item`s, made once."""
    found = types.get(size)
    if found is None:
        found = types[size] = item * size
    return found


def _even_lists(slots: Any) -> bool:
    """Whether every stage's macro array holds an even number of strings (name, value pairs).

    Only then is smfi_getsymval's walk, two pointers at a time, sure to meet the NULL.
    """
    if _usable_size is None:
        return False
    for stage in range(_MAX_MACROS_ENTRIES):
        argv = slots[stage]
        if not argv or not slots[_MAX_MACROS_ENTRIES + stage]:
            continue
        size = _usable_size(argv) >> 3
        pointers = _array(_POINTER_ARRAYS, ctypes.c_void_p, size).from_address(argv)[:]
        if None not in pointers:
            return False  # no NULL inside the allocation: not an array dec_argv made
        if pointers.index(None) % 2:
            return False
    return True


def ctx_macro(lib: Libmilter, ctx: int, name: bytes) -> bytes | None:
    """smfi_getsymval's answer, without walking past an odd-length macro list.

    Same lookup: latest stage first, `x` also matches `{x}` and `{x}` matches `x`; a name
    without a value (the odd one out) has none. When every list has pairs only (what MTAs
    send), smfi_getsymval itself answers (~1 us per stage checked; the walk here is slower).
    """
    if not name:
        return None  # as smfi_getsymval
    if not layout_known(ctx):
        return lib.smfi_getsymval(ctx, name)
    slots = _SLOTS.from_address(ctx + _CTX_MAC_PTR)
    if _even_lists(slots):
        return lib.smfi_getsymval(ctx, name)
    return ctx_macros(ctx).get(macro_key(name))


def macro_key(name: bytes) -> bytes:
    """The key smfi_getsymval treats `name` as: `{x}` of one letter is `x`."""
    return name[1:2] if len(name) == 3 and name[:1] == b"{" and name[2:] == b"}" else name


def ctx_macros(ctx: int) -> dict[bytes, bytes | None]:
    """A copy of every macro `ctx` holds, by `macro_key`, as smfi_getsymval finds them (latest
    stage first; the odd one out has no value); layout known. Later packets cannot free it."""
    slots = _SLOTS.from_address(ctx + _CTX_MAC_PTR)
    found: dict[bytes, bytes | None] = {}
    for stage in range(_MAX_MACROS_ENTRIES - 1, -1, -1):
        argv, buf = slots[stage], slots[_MAX_MACROS_ENTRIES + stage]
        if argv and buf:
            strings = _stage_macros(argv, buf)
            for index in range(0, len(strings), 2):
                value = strings[index + 1] if index + 1 < len(strings) else None
                found.setdefault(macro_key(strings[index]), value)
    return found


def stage_macros(ctx: int, slot: int) -> list[bytes] | None:
    """The macro strings the MTA sent for macro stage `slot` (names and values alternate),
    or None when contexts cannot be read directly."""
    slots = _VIEWS.get(ctx)  # the view of a context's slots, kept: it is read per stage
    if slots is None:
        if _Layout.known is not True and not layout_known(ctx):
            return None
        if len(_VIEWS) >= _MAX_VIEWS:  # contexts' addresses are reused: rarely reached
            _VIEWS.clear()
        slots = _VIEWS[ctx] = _SLOTS.from_address(ctx + _CTX_MAC_PTR)
    argv, buf = slots[slot], slots[_MAX_MACROS_ENTRIES + slot]
    if not argv or not buf:
        return []
    if _usable_size is not None:  # the quick way: pointers up to the array's NULL, in bounds
        size = _usable_size(argv) >> 3
        pointers = (_POINTER_ARRAYS.get(size) or _array(_POINTER_ARRAYS, ctypes.c_void_p, size)
                    ).from_address(argv)[:]
        if pointers and pointers[0] is None:  # no macros
            return []
        if None in pointers:
            size = pointers.index(None)
            strings: list[bytes] = (
                _STRING_ARRAYS.get(size) or _array(_STRING_ARRAYS, ctypes.c_char_p, size)
            ).from_address(argv)[:]
            return strings
    return _stage_macros(argv, buf)


# -- The unknown command's length ---------------------------------------------------------------
#
# libmilter passes xxfi_unknown only the packet's pointer (and does not check for its NUL), but
# mi_engine holds the packet's length in its `genarg` (struct arg_struct: size_t a_len; char
# *a_buf; int a_idx; SMFICTX *a_ctx) on this thread's stack, with a_buf == the command, a_idx ==
# -1 (no macro stage) and a_ctx == the context: found by scanning the top of the worker
# thread's stack for exactly that triple.
_GENARG = struct.Struct("=QQi4xQ")
_STACK_SCAN = 256 << 10


class _Pthread:
    """glibc's pthread functions that find a thread's stack, declared at first use."""

    functions: tuple[Any, ...] | None = None

    @classmethod
    def get(cls) -> tuple[Any, ...]:
        """(pthread_self, pthread_getattr_np, pthread_attr_getstack, pthread_attr_destroy),
        or () where the C library lacks them."""
        if cls.functions is None:
            functions: tuple[Any, ...]
            try:
                functions = (
                    _libc.pthread_self,
                    _libc.pthread_getattr_np,
                    _libc.pthread_attr_getstack,
                    _libc.pthread_attr_destroy,
                )
            except AttributeError:
                functions = ()
            else:
                functions[0].restype = ctypes.c_ulong
                functions[1].argtypes = [ctypes.c_ulong, ctypes.c_void_p]
                functions[2].argtypes = [
                    ctypes.c_void_p,
                    ctypes.POINTER(ctypes.c_void_p),
                    ctypes.POINTER(ctypes.c_size_t),
                ]
                functions[3].argtypes = [ctypes.c_void_p]
            cls.functions = functions
        return cls.functions


def _stack_top() -> tuple[int, int] | None:
    """This thread's stack as (lowest address, size), or None (not glibc)."""
    functions = _Pthread.get()
    if not functions:
        return None
    self_, getattr_np, getstack, destroy = functions
    attr = ctypes.create_string_buffer(256)  # pthread_attr_t is 56 bytes on x86-64 glibc
    if getattr_np(self_(), attr) != 0:
        return None
    try:
        low, size = ctypes.c_void_p(), ctypes.c_size_t()
        if getstack(attr, ctypes.byref(low), ctypes.byref(size)) != 0 or not low.value:
            return None
        return low.value, size.value
    finally:
        destroy(attr)


def _packet_length(ctx: int, pointer: int, bound: int) -> int | None:
    """The length mi_engine read for the packet at `pointer` of `ctx`, or None if not found."""
    stack = _stack_top()
    if stack is None:
        return None
    low, size = stack
    start = max(low, low + size - _STACK_SCAN)
    blob = ctypes.string_at(start, low + size - start)
    needle = struct.pack("=Q", pointer)
    found = None
    at = blob.find(needle, 8)
    while at >= 0:
        if at % 8 == 0 and at + 24 <= len(blob):
            length, buf, idx, owner = _GENARG.unpack_from(blob, at - 8)
            if buf == pointer and idx == -1 and owner == ctx and 0 < length <= bound:
                found = length  # keep the outermost (highest) match: mi_engine's frame
        at = blob.find(needle, at + 1)
    return found


def unknown_command(ctx: int, pointer: int | None) -> bytes:
    """xxfi_unknown's command: only the packet's bytes, up to its NUL.

    libmilter passes the packet without checking for its NUL, so reading it as a C string
    reads past the packet. The length comes from mi_engine's frame (see _GENARG); where that is
    not found (another libc or libmilter build), the read stops at the end of the packet's
    heap allocation (malloc_usable_size), and an unterminated command may then carry up to 23
    stale bytes of that allocation.
    """
    if not pointer:
        return b""
    if _usable_size is None:
        return ctypes.string_at(pointer)
    bound = _usable_size(pointer)
    length = _packet_length(ctx, pointer, bound) if layout_known(ctx) else None
    blob = ctypes.string_at(pointer, bound if length is None else length)
    return _cstring(pointer, pointer, blob)


# -- Answering a stage after its callback returned (async stages, `_trampolines`) -------------
#
# An `async def` stage's callback hands the coroutine to the event loop and returns
# SMFIS_NOREPLY: libmilter sends nothing, finds no next command within a millisecond and parks
# the session, so its worker thread is free. When the coroutine is done, the loop sends the
# answer itself with libmilter's own writer (mi_wr_cmd, exported by the Debian .so) on the
# context's socket, as engine.c's sendreply would have: SMFIR_REPLYCODE with the reply text a
# set_reply stored (ctx_reply) when its class matches the status, else the status's command.
# Used only when the context layout is known (`layout_known`); the context and its socket stay
# valid until xxfi_close returns, and the runner's close waits for a pending answer.


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


_WRITE_TIMEOUT = 10


class _Writer:
    """libmilter's mi_wr_cmd, declared at first use."""

    function: Any = None

    @classmethod
    def get(cls) -> Any:
        """int mi_wr_cmd(socket_t sd, struct timeval *timeout, int cmd, char *buf, size_t len)"""
        if cls.function is None:
            function = handle().mi_wr_cmd
            function.argtypes = [
                ctypes.c_int, ctypes.POINTER(_Timeval), ctypes.c_int, ctypes.c_char_p,
                ctypes.c_size_t,
            ]
            function.restype = ctypes.c_int
            cls.function = function
        return cls.function


def can_answer_later(ctx: int) -> bool:
    """Whether a stage of `ctx` may be answered after its callback returned."""
    if not layout_known(ctx):
        return False  # layout_known has said so
    if hasattr(handle(), "mi_wr_cmd"):
        return True
    logger.warning(
        "libmilter (libmilter_version() %s) does not export mi_wr_cmd: late answers fall back "
        "(a suspended async stage holds its libmilter thread until answered)",
        _dotted(version()),
    )
    return False


def ctx_state(ctx: int) -> int:
    """engine.c's state of `ctx` (layout must be known)."""
    return ctypes.c_int.from_address(ctx + _CTX_STATE).value


def send_reply(ctx: int, status: int) -> bool:
    """Send the answer `status` (SMFIS_*) for the stage `ctx` is in; False if it failed."""
    command = REPLY_LETTER.get(status)
    if command is None:
        return True  # NOREPLY and the like: nothing is sent
    sd = ctypes.c_int.from_address(ctx + _CTX_SD).value
    timeout = _Timeval(_WRITE_TIMEOUT, 0)
    write = _Writer.get()
    reply = ctypes.c_void_p.from_address(ctx + _CTX_REPLY)
    first = REPLY_CLASS.get(status)
    if reply.value and first is not None:
        text = ctypes.string_at(reply.value)
        if text[:1] == first:  # else it stays for a later answer, as in sendreply
            result = write(sd, ctypes.byref(timeout), ord(REPLYCODE), text + b"\0", len(text) + 1)
            _free(reply.value)  # mi_wr_cmd does not; sendreply frees it after the write too
            reply.value = None
            return bool(result == MI_SUCCESS)
    return bool(write(sd, ctypes.byref(timeout), ord(command), None, 0) == MI_SUCCESS)


def hang_up(ctx: int) -> None:
    """Shut the context's socket down, so libmilter ends the session at its next read."""
    sd = ctypes.c_int.from_address(ctx + _CTX_SD).value
    with contextlib.suppress(OSError):
        dup = socket.socket(fileno=os.dup(sd))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


def serve(lib: Libmilter, desc: Any, conn: bytes, dbg: int, timeout: int, backlog: int) -> int:
    """What smfi_main does (listen and serve until `smfi_stop`), without its signal thread.

    smfi_main = ignore SIGPIPE (Python does already) + start the `sigwait` thread + mi_listener.
    The signals are the runner's (`_signals.handled`): libmilter's thread would take any of them
    the main thread cannot take at once (one already pending), and stop serving at once. `desc`
    is the smfiDesc given to smfi_register (which copies it); the others as set with smfi_*.
    """
    listener = getattr(handle(), "mi_listener", None)
    if listener is None or version() != _KNOWN_VERSION:
        logger.warning(
            "libmilter (libmilter_version() %s) %s: its signal thread runs, and a signal it "
            "takes stops serving at once",
            _dotted(version()),
            "does not export mi_listener" if listener is None else "is not the known build",
        )
        return lib.smfi_main()
    # int mi_listener(char *conn, int dbg, smfiDesc_ptr smfi, time_t timeout, int backlog)
    listener.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                         ctypes.c_int]
    listener.restype = ctypes.c_int
    return int(listener(conn, dbg, ctypes.addressof(desc), timeout, backlog))
