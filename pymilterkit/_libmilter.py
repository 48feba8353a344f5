"""Every ctypes declaration of pymilterkit: loading libmilter, its structs and prototypes.

No other module imports ctypes. libmilter is described as a typed `Protocol` (`Libmilter`) and
the loaded handle is cast to it, so the rest of the package stays `mypy --strict` clean. Loading
is lazy (`load()`): importing pymilterkit never needs libmilter.

The C prototypes are from libmilter/mfapi.h (8.17, Debian libmilter1.0.1).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import struct
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol, cast

from . import _protocol
from ._errors import LibraryNotFoundError
from ._types import InetAddress, UnixAddress

__all__ = [
    "MI_SUCCESS",
    "SMFI_VERSION",
    "Callbacks",
    "Libmilter",
    "SmfiDesc",
    "argv_to_bytes",
    "body_bytes",
    "load",
    "prctl",
    "python_api",
    "sockaddr_to_address",
]

MI_SUCCESS, MI_FAILURE = _protocol.MI_SUCCESS, _protocol.MI_FAILURE
SMFI_VERSION = 0x01000001

SONAMES = ("libmilter.so.1.0.1", "libmilter.so.1.0", "libmilter.so.1", "libmilter.so")
PACKAGE_HINT = "install the Debian/Ubuntu package libmilter1.0.1 (apt-get install libmilter1.0.1)"

CTX = ctypes.c_void_p
_ulong_p = ctypes.POINTER(ctypes.c_ulong)
_char_pp = ctypes.POINTER(ctypes.c_char_p)

# One CFUNCTYPE per callback shape of struct smfiDesc.
CONNECT = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_char_p, ctypes.c_void_p)
STR1 = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_char_p)  # helo
# unknown: a raw pointer, read by unknown_command() (a c_char_p would over-read, issue 19.3).
PTR1 = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_void_p)
# envfrom, envrcpt: char **. Declared as a pointer to c_char_p, ctypes hands the trampoline an
# indexable array object: ~0.1 us per call, where casting a c_void_p cost ~0.5 us.
ARGV = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.POINTER(ctypes.c_char_p))
STR2 = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_char_p, ctypes.c_char_p)  # header
CTXONLY = ctypes.CFUNCTYPE(ctypes.c_int, CTX)  # eoh, eom, abort, close, data
BODY = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_void_p, ctypes.c_size_t)
NEGOTIATE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    CTX,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    _ulong_p,
    _ulong_p,
    _ulong_p,
    _ulong_p,
)


class SmfiDesc(ctypes.Structure):
    """struct smfiDesc (128 bytes on LP64; passed to smfi_register by value)."""

    _fields_ = [
        ("xxfi_name", ctypes.c_char_p),
        ("xxfi_version", ctypes.c_int),
        ("xxfi_flags", ctypes.c_ulong),
        ("xxfi_connect", CONNECT),
        ("xxfi_helo", STR1),
        ("xxfi_envfrom", ARGV),
        ("xxfi_envrcpt", ARGV),
        ("xxfi_header", STR2),
        ("xxfi_eoh", CTXONLY),
        ("xxfi_body", BODY),
        ("xxfi_eom", CTXONLY),
        ("xxfi_abort", CTXONLY),
        ("xxfi_close", CTXONLY),
        ("xxfi_unknown", PTR1),
        ("xxfi_data", CTXONLY),
        ("xxfi_negotiate", NEGOTIATE),
    ]


class Libmilter(Protocol):
    """The smfi_* functions, typed as pymilterkit calls them (ctx is an int address)."""

    def smfi_register(self, desc: SmfiDesc, /) -> int: ...
    def smfi_setconn(self, conn: bytes, /) -> int: ...
    def smfi_settimeout(self, timeout: int, /) -> int: ...
    def smfi_setbacklog(self, backlog: int, /) -> int: ...
    def smfi_setdbg(self, level: int, /) -> int: ...
    def smfi_opensocket(self, rmsocket: int, /) -> int: ...
    def smfi_main(self) -> int: ...
    def smfi_stop(self) -> int: ...
    def smfi_setmaxdatasize(self, size: int, /) -> int: ...
    def smfi_version(self, major: Any, minor: Any, patch: Any, /) -> int: ...
    def smfi_getsymval(self, ctx: int, name: bytes, /) -> bytes | None: ...
    def smfi_setreply(
        self, ctx: int, rcode: bytes, xcode: bytes | None, message: bytes | None, /
    ) -> int: ...
    def smfi_addheader(self, ctx: int, name: bytes, value: bytes, /) -> int: ...
    def smfi_chgheader(self, ctx: int, name: bytes, index: int, value: bytes | None, /) -> int: ...
    def smfi_insheader(self, ctx: int, index: int, name: bytes, value: bytes, /) -> int: ...
    def smfi_chgfrom(self, ctx: int, mail: bytes, args: bytes | None, /) -> int: ...
    def smfi_addrcpt(self, ctx: int, rcpt: bytes, /) -> int: ...
    def smfi_addrcpt_par(self, ctx: int, rcpt: bytes, args: bytes | None, /) -> int: ...
    def smfi_delrcpt(self, ctx: int, rcpt: bytes, /) -> int: ...
    def smfi_replacebody(self, ctx: int, body: bytes, length: int, /) -> int: ...
    def smfi_progress(self, ctx: int, /) -> int: ...
    def smfi_quarantine(self, ctx: int, reason: bytes, /) -> int: ...
    def smfi_setsymlist(self, ctx: int, where: int, macros: bytes, /) -> int: ...


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_char_p, c_void_p, c_uint_p = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint),
    )
    protos: dict[str, tuple[list[Any], Any]] = {
        # int smfi_register(struct smfiDesc descr)
        "smfi_register": ([SmfiDesc], c_int),
        # int smfi_setconn(char *oconn)
        "smfi_setconn": ([c_char_p], c_int),
        # int smfi_settimeout(int otimeout)
        "smfi_settimeout": ([c_int], c_int),
        # int smfi_setbacklog(int obacklog)
        "smfi_setbacklog": ([c_int], c_int),
        # int smfi_setdbg(int level)
        "smfi_setdbg": ([c_int], c_int),
        # int smfi_opensocket(bool rmsocket)
        "smfi_opensocket": ([c_int], c_int),
        # int smfi_main(void)
        "smfi_main": ([], c_int),
        # int smfi_stop(void)
        "smfi_stop": ([], c_int),
        # size_t smfi_setmaxdatasize(size_t)
        "smfi_setmaxdatasize": ([ctypes.c_size_t], ctypes.c_size_t),
        # int smfi_version(unsigned int *, unsigned int *, unsigned int *)
        "smfi_version": ([c_uint_p, c_uint_p, c_uint_p], c_int),
        # char *smfi_getsymval(SMFICTX *, char *)
        "smfi_getsymval": ([CTX, c_char_p], c_char_p),
        # int smfi_setreply(SMFICTX *, char *rcode, char *xcode, char *message)
        "smfi_setreply": ([CTX, c_char_p, c_char_p, c_char_p], c_int),
        # int smfi_setmlreply(SMFICTX *, const char *, const char *, ...): variadic, the
        # lines are passed per call (see setmlreply()).
        "smfi_setmlreply": ([CTX, c_char_p, c_char_p], c_int),
        # int smfi_addheader(SMFICTX *, char *headerf, char *headerv)
        "smfi_addheader": ([CTX, c_char_p, c_char_p], c_int),
        # int smfi_chgheader(SMFICTX *, char *headerf, int hdridx, char *headerv)
        "smfi_chgheader": ([CTX, c_char_p, c_int, c_char_p], c_int),
        # int smfi_insheader(SMFICTX *, int hdridx, char *headerf, char *headerv)
        "smfi_insheader": ([CTX, c_int, c_char_p, c_char_p], c_int),
        # int smfi_chgfrom(SMFICTX *, char *mail, char *args)
        "smfi_chgfrom": ([CTX, c_char_p, c_char_p], c_int),
        # int smfi_addrcpt(SMFICTX *, char *rcpt)
        "smfi_addrcpt": ([CTX, c_char_p], c_int),
        # int smfi_addrcpt_par(SMFICTX *, char *rcpt, char *args)
        "smfi_addrcpt_par": ([CTX, c_char_p, c_char_p], c_int),
        # int smfi_delrcpt(SMFICTX *, char *rcpt)
        "smfi_delrcpt": ([CTX, c_char_p], c_int),
        # int smfi_replacebody(SMFICTX *, unsigned char *bodyp, int bodylen)
        "smfi_replacebody": ([CTX, c_char_p, c_int], c_int),
        # int smfi_progress(SMFICTX *)
        "smfi_progress": ([CTX], c_int),
        # int smfi_quarantine(SMFICTX *, char *reason)
        "smfi_quarantine": ([CTX, c_char_p], c_int),
        # int smfi_setpriv(SMFICTX *, void *) / void *smfi_getpriv(SMFICTX *): unused, the
        # runner keys sessions by context address; declared for completeness.
        "smfi_setpriv": ([CTX, c_void_p], c_int),
        "smfi_getpriv": ([CTX], c_void_p),
        # int smfi_setsymlist(SMFICTX *, int where, char *macros)
        "smfi_setsymlist": ([CTX, c_int, c_char_p], c_int),
    }
    for name, (argtypes, restype) in protos.items():
        func = getattr(lib, name)
        func.argtypes = argtypes
        func.restype = restype


_lock = threading.Lock()
_loaded: tuple[Libmilter, ctypes.CDLL] | None = None


def _candidates() -> list[str]:
    override = os.environ.get("PYMILTERKIT_LIBMILTER")
    if override:
        return [override]
    names = list(SONAMES)
    found = ctypes.util.find_library("milter")
    if found and found not in names:
        names.append(found)
    return names


def load() -> Libmilter:
    """Load libmilter once (env PYMILTERKIT_LIBMILTER overrides the path)."""
    global _loaded
    with _lock:
        if _loaded is None:
            errors: list[str] = []
            for name in _candidates():
                try:
                    lib = ctypes.CDLL(name)
                except OSError as exc:
                    errors.append(f"  {name}: {exc}")
                    continue
                try:
                    _declare(lib)
                except AttributeError as exc:
                    errors.append(f"  {name}: not a usable libmilter ({exc})")
                    continue
                _loaded = (cast(Libmilter, lib), lib)
                break
            else:
                raise LibraryNotFoundError(
                    "libmilter could not be loaded; tried:\n"
                    + "\n".join(errors)
                    + f"\nTo fix: {PACKAGE_HINT}, or set PYMILTERKIT_LIBMILTER to its path."
                )
        return _loaded[0]


def version() -> tuple[int, int, int]:
    """smfi_version() of the loaded library."""
    load()
    assert _loaded is not None
    major, minor, patch = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
    _loaded[1].smfi_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    return major.value, minor.value, patch.value


def setmlreply(ctx: int, code: bytes, xcode: bytes | None, lines: list[bytes]) -> int:
    """smfi_setmlreply with a NULL-terminated variadic list of lines."""
    assert _loaded is not None
    args = [ctypes.c_char_p(line) for line in lines]
    result: int = _loaded[1].smfi_setmlreply(ctx, code, xcode, *args, ctypes.c_char_p(None))
    return result


def write_negotiation(
    pf0: Any, pf1: Any, pf2: Any, pf3: Any, actions: int, opts: int
) -> None:
    """Fill xxfi_negotiate's four out-parameters."""
    pf0[0] = actions
    pf1[0] = opts
    pf2[0] = 0
    pf3[0] = 0


def argv_to_bytes(argv: Any) -> list[bytes]:
    """A NULL-terminated `char **` (envfrom/envrcpt: an ARGV argument, or an address) as bytes."""
    out: list[bytes] = []
    if not argv:
        return out
    array = argv if isinstance(argv, _char_pp) else ctypes.cast(argv, _char_pp)
    i = 0
    while True:
        item = array[i]
        if item is None:
            return out
        out.append(item)
        i += 1


def body_bytes(pointer: int | None, length: int) -> bytes:
    """Copy a body chunk (may contain NULs)."""
    if not pointer or not length:
        return b""
    return ctypes.string_at(pointer, length)


_SA_FAMILY = struct.Struct("=H")


def sockaddr_to_address(pointer: int | None) -> InetAddress | UnixAddress | None:
    """Convert libmilter's `_SOCK_ADDR *` to an address; None when NULL or unknown."""
    if not pointer:
        return None
    (family,) = _SA_FAMILY.unpack(ctypes.string_at(pointer, 2))
    if family == socket.AF_INET:
        raw = ctypes.string_at(pointer, 16)
        port = int.from_bytes(raw[2:4], "big")
        return InetAddress(IPv4Address(raw[4:8]), port)
    if family == socket.AF_INET6:
        raw = ctypes.string_at(pointer, 28)
        port = int.from_bytes(raw[2:4], "big")
        return InetAddress(IPv6Address(raw[8:24]), port)
    if family == socket.AF_UNIX:
        raw = ctypes.string_at(pointer + 2, 108)
        return UnixAddress(raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
    return None


# The interpreter's C API through our own handle (as ctypes.pythonapi, whose shared function
# objects other code may have declared differently): PyDLL keeps the GIL across these calls.
python_api = ctypes.PyDLL(None)
"""The CPython C API, declared here; `_threadstate` uses it."""
python_api.PyGILState_Ensure.argtypes = []
python_api.PyGILState_Ensure.restype = ctypes.c_int
python_api.PyThreadState_Get.argtypes = []
python_api.PyThreadState_Get.restype = ctypes.c_void_p
python_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
python_api.PyThreadState_Clear.restype = None
python_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
python_api.PyThreadState_Delete.restype = None
python_api.PyInterpreterState_Get.argtypes = []
python_api.PyInterpreterState_Get.restype = ctypes.c_void_p
python_api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
python_api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
python_api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
python_api.PyThreadState_Next.restype = ctypes.c_void_p



class Callbacks:
    """The C-callable objects handed to libmilter; kept alive for the life of the process."""

    keep: list[Any] = []

    @classmethod
    def make(cls, shape: str, func: Callable[..., int]) -> Any:
        factory = {
            "connect": CONNECT,
            "str1": STR1,
            "ptr1": PTR1,
            "argv": ARGV,
            "str2": STR2,
            "ctx": CTXONLY,
            "body": BODY,
            "negotiate": NEGOTIATE,
        }[shape]
        cfunc = factory(func)
        cls.keep.append(cfunc)
        return cfunc


_libc_errno = ctypes.CDLL(None, use_errno=True)
prctl = _libc_errno.prctl
"""int prctl(int option, unsigned long arg2, arg3, arg4, arg5)"""
prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
prctl.restype = ctypes.c_int


# -- A context's macros and the unknown command, read without over-reading (issue 19.3) --------
#
# smfi_getsymval steps over name/value pairs two pointers at a time; a macro packet with an odd
# number of strings (an MTA stand-in can send one) makes it step past the array's NULL and
# strcmp garbage: a segfault. So pymilterkit reads the macro arrays itself: smfi_getsymval
# answers only when every array holds pairs, otherwise the lookup walks them here, bounded by
# the array's end and the packet's allocation. The offsets are those of `struct smfi_str`
# (libmilter/libmilter.h) of libmilter 1.0.1 (sendmail 8.14-8.17) on LP64: ctx_id, ctx_sd,
# ctx_dbg, ctx_timeout, ctx_state, ctx_smfi, ctx_prot_vers, ctx_aflags, ctx_pflags,
# ctx_pflags2mta, ctx_prot_vers2mta, then ctx_mac_ptr[7] (char **, one per stage),
# ctx_mac_buf[7] (the packet each points into), ctx_mac_list[7], ctx_reply, ctx_privdata.
# Before trusting them, the layout is checked once on a live context: smfi_setpriv must land
# at ctx_privdata's offset. Any other build falls back to smfi_getsymval.
_CTX_MAC_PTR = 80
_CTX_PRIVDATA = 256
_MAX_MACROS_ENTRIES = 7
_MAX_ARGV = 1 << 16  # a packet of at most 64 KiB has fewer strings than this
_layout_known: bool | None = None

_libc = ctypes.CDLL(None)
# size_t malloc_usable_size(void *): bounds a read to the allocation it starts in (glibc, musl).
_usable_size: Any = getattr(_libc, "malloc_usable_size", None)
if _usable_size is not None:
    _usable_size.argtypes = [ctypes.c_void_p]
    _usable_size.restype = ctypes.c_size_t


def _check_layout(ctx: int) -> bool:
    """Whether `ctx` has the struct smfi_str layout above (same for every context)."""
    if ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(ctypes.c_long) != 8:
        return False
    if version() != (1, 0, 1):
        return False
    assert _loaded is not None
    raw = _loaded[1]
    marker = ctypes.c_char()
    address = ctypes.addressof(marker)
    if raw.smfi_setpriv(ctx, address) != MI_SUCCESS:
        return False
    try:
        seen = ctypes.c_void_p.from_address(ctx + _CTX_PRIVDATA).value
    finally:
        raw.smfi_setpriv(ctx, None)  # pymilterkit keeps no private data (mi_clr_ctx checks)
    return seen == address


def layout_known(ctx: int) -> bool:
    """Whether contexts can be read directly (checked once per process, on `ctx`)."""
    global _layout_known
    if _layout_known is None:
        _layout_known = _check_layout(ctx)
    return _layout_known


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
        array_type = _POINTER_ARRAYS.get(size)
        if array_type is None:
            array_type = _POINTER_ARRAYS[size] = ctypes.c_void_p * size
        pointers = array_type.from_address(argv)[:]
        if None not in pointers:
            return False  # no NULL inside the allocation: not an array dec_argv made
        if pointers.index(None) % 2:
            return False
    return True


_POINTER_ARRAYS: dict[int, Any] = {}  # ctypes array types by length (at most ~4,100)


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
    one = name[1:2] if len(name) == 3 and name[:1] == b"{" and name[2:] == b"}" else None
    braces = b"{" + name + b"}" if len(name) == 1 else None
    for stage in range(_MAX_MACROS_ENTRIES - 1, -1, -1):
        argv, buf = slots[stage], slots[_MAX_MACROS_ENTRIES + stage]
        if not argv or not buf:
            continue
        strings = _stage_macros(argv, buf)
        for index in range(0, len(strings), 2):
            key = strings[index]
            if key in (name, one, braces):
                return strings[index + 1] if index + 1 < len(strings) else None
    return None


# The unknown command's length: libmilter passes xxfi_unknown only the packet's pointer (and
# does not check for its NUL), but mi_engine holds the packet's length in its `genarg` (struct
# arg_struct: size_t a_len; char *a_buf; int a_idx; SMFICTX *a_ctx) on this thread's stack, with
# a_buf == the command, a_idx == -1 (no macro stage) and a_ctx == the context: found by
# scanning the top of the worker thread's stack for exactly that triple.
_GENARG = struct.Struct("=QQi4xQ")
_STACK_SCAN = 256 << 10
_pthread: Any = None


def _stack_top() -> tuple[int, int] | None:
    """This thread's stack as (lowest address, size), or None (not glibc)."""
    global _pthread
    if _pthread is None:
        try:
            _pthread = (
                _libc.pthread_self,
                _libc.pthread_getattr_np,
                _libc.pthread_attr_getstack,
                _libc.pthread_attr_destroy,
            )
        except AttributeError:
            _pthread = ()
        else:
            _pthread[0].restype = ctypes.c_ulong
            _pthread[1].argtypes = [ctypes.c_ulong, ctypes.c_void_p]
            _pthread[2].argtypes = [
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_size_t),
            ]
            _pthread[3].argtypes = [ctypes.c_void_p]
    if not _pthread:
        return None
    self_, getattr_np, getstack, destroy = _pthread
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
_CTX_SD = 8
_CTX_TIMEOUT = 16
_CTX_STATE = 24
_CTX_REPLY = 248
ST_BODY, ST_ENDM = 9, 10
"""engine.c's states while xxfi_body runs for a body chunk / inside end of message."""


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


_free = _libc.free
_free.argtypes = [ctypes.c_void_p]
_free.restype = None
_wr_cmd: Any = None
_REPLY_COMMANDS = {0: b"c", 1: b"r", 2: b"d", 3: b"a", 4: b"t", 8: b"s"}  # SMFIS_* -> SMFIR_*
_WRITE_TIMEOUT = 10


def _writer() -> Any:
    """int mi_wr_cmd(socket_t sd, struct timeval *timeout, int cmd, char *buf, size_t len)"""
    global _wr_cmd
    if _wr_cmd is None:
        assert _loaded is not None
        function = _loaded[1].mi_wr_cmd
        function.argtypes = [
            ctypes.c_int, ctypes.POINTER(_Timeval), ctypes.c_int, ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        function.restype = ctypes.c_int
        _wr_cmd = function
    return _wr_cmd


def can_answer_later(ctx: int) -> bool:
    """Whether a stage of `ctx` may be answered after its callback returned."""
    if not layout_known(ctx):
        return False
    assert _loaded is not None
    return hasattr(_loaded[1], "mi_wr_cmd")


def ctx_state(ctx: int) -> int:
    """engine.c's state of `ctx` (layout must be known)."""
    return ctypes.c_int.from_address(ctx + _CTX_STATE).value


def send_reply(ctx: int, status: int) -> bool:
    """Send the answer `status` (SMFIS_*) for the stage `ctx` is in; False if it failed."""
    command = _REPLY_COMMANDS.get(status)
    if command is None:
        return True  # NOREPLY and the like: nothing is sent
    sd = ctypes.c_int.from_address(ctx + _CTX_SD).value
    timeout = _Timeval(_WRITE_TIMEOUT, 0)
    reply = ctypes.c_void_p.from_address(ctx + _CTX_REPLY)
    if reply.value and status in (1, 4):
        text = ctypes.string_at(reply.value)
        if text[:1] == (b"5" if status == 1 else b"4"):
            result = _writer()(sd, ctypes.byref(timeout), ord("y"), text + b"\0", len(text) + 1)
            _free(reply.value)
            reply.value = None
            return bool(result == MI_SUCCESS)
    return bool(_writer()(sd, ctypes.byref(timeout), ord(command), None, 0) == MI_SUCCESS)


def hang_up(ctx: int) -> None:
    """Shut the context's socket down, so libmilter ends the session at its next read."""
    sd = ctypes.c_int.from_address(ctx + _CTX_SD).value
    with contextlib.suppress(OSError):
        _shutdown(sd)


def _shutdown(sd: int) -> None:
    dup = socket.socket(fileno=os.dup(sd))
    try:
        dup.shutdown(socket.SHUT_RDWR)
    finally:
        dup.close()
