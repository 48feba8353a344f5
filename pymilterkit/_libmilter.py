"""The ctypes bindings of libmilter's public API: loading, constants, smfiDesc, prototypes.

Every ctypes declaration of what libmilter (and the C library, and CPython's C API) promise
lives here. libmilter is described as a typed `Protocol` (`Libmilter`) and the loaded handle is
cast to it, so the rest of the package stays `mypy --strict` clean. Loading is lazy (`load()`):
importing pymilterkit never needs libmilter.

The one other module that uses ctypes is `_libmilter_private`: what depends on this libmilter
build's private layout (struct smfi_str, mi_wr_cmd, mi_engine's stack frame), behind its own
layout check. It is kept apart so that this module stays true for any libmilter 1.0.

The C prototypes are from libmilter/mfapi.h (8.17, Debian libmilter1.0.1).
"""

from __future__ import annotations

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
    "body_bytes",
    "handle",
    "load",
    "prctl",
    "python_api",
    "set_thread_name",
    "setmlreply",
    "sockaddr_to_address",
    "version",
    "write_negotiation",
]

MI_SUCCESS, MI_FAILURE = _protocol.MI_SUCCESS, _protocol.MI_FAILURE
SMFI_VERSION = 0x01000001

SONAMES = ("libmilter.so.1.0.1", "libmilter.so.1.0", "libmilter.so.1", "libmilter.so")
PACKAGE_HINT = "install the Debian/Ubuntu package libmilter1.0.1 (apt-get install libmilter1.0.1)"

CTX = ctypes.c_void_p
_ulong_p = ctypes.POINTER(ctypes.c_ulong)

# One CFUNCTYPE per callback shape of struct smfiDesc.
CONNECT = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_char_p, ctypes.c_void_p)
STR1 = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_char_p)  # helo
# unknown: a raw pointer, read by `_libmilter_private.unknown_command` (a c_char_p would read
# past a packet without its NUL).
PTR1 = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_void_p)
# envfrom, envrcpt: char **. Declared as a pointer to c_char_p, ctypes hands the trampoline an
# indexable array object: ~0.1 us per call, where casting a c_void_p cost ~0.5 us.
ARGV = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.POINTER(ctypes.c_char_p))
STR2 = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_char_p, ctypes.c_char_p)  # header
CTXONLY = ctypes.CFUNCTYPE(ctypes.c_int, CTX)  # eoh, eom, abort, close, data
BODY = ctypes.CFUNCTYPE(ctypes.c_int, CTX, ctypes.c_void_p, ctypes.c_size_t)
# negotiate: the four offered values (f0-f3), then the four the filter requests (pf0-pf3).
NEGOTIATE = ctypes.CFUNCTYPE(ctypes.c_int, CTX, *[ctypes.c_ulong] * 4, *[_ulong_p] * 4)


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
    c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
    c_uint_p = ctypes.POINTER(ctypes.c_uint)
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
        # int smfi_setpriv(SMFICTX *, void *) / void *smfi_getpriv(SMFICTX *): the runner keys
        # sessions by context address; setpriv serves `_libmilter_private`'s layout check.
        "smfi_setpriv": ([CTX, c_void_p], c_int),
        "smfi_getpriv": ([CTX], c_void_p),
        # int smfi_setsymlist(SMFICTX *, int where, char *macros)
        "smfi_setsymlist": ([CTX, c_int, c_char_p], c_int),
    }
    for name, (argtypes, restype) in protos.items():
        func = getattr(lib, name)
        func.argtypes = argtypes
        func.restype = restype


class _Loaded:
    """The library once loaded: typed, and the raw handle."""

    lock = threading.Lock()
    typed: Libmilter | None = None
    raw: ctypes.CDLL | None = None


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
    with _Loaded.lock:
        if _Loaded.typed is None:
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
                _Loaded.typed, _Loaded.raw = cast(Libmilter, lib), lib
                break
            else:
                raise LibraryNotFoundError(
                    "libmilter could not be loaded; tried:\n"
                    + "\n".join(errors)
                    + f"\nTo fix: {PACKAGE_HINT}, or set PYMILTERKIT_LIBMILTER to its path."
                )
        return _Loaded.typed


def handle() -> ctypes.CDLL:
    """The loaded library itself, for what the `Libmilter` protocol does not describe
    (`_libmilter_private`: smfi_setpriv, mi_wr_cmd)."""
    load()
    assert _Loaded.raw is not None
    return _Loaded.raw


def version() -> tuple[int, int, int]:
    """smfi_version() of the loaded library."""
    major, minor, patch = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
    handle().smfi_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    return major.value, minor.value, patch.value


def setmlreply(ctx: int, code: bytes, xcode: bytes | None, lines: list[bytes]) -> int:
    """smfi_setmlreply with a NULL-terminated variadic list of lines."""
    raw = _Loaded.raw
    assert raw is not None
    args = [ctypes.c_char_p(line) for line in lines]
    result: int = raw.smfi_setmlreply(ctx, code, xcode, *args, ctypes.c_char_p(None))
    return result


def write_negotiation(
    pf0: Any, pf1: Any, pf2: Any, pf3: Any, actions: int, opts: int
) -> None:
    """Fill xxfi_negotiate's four out-parameters."""
    pf0[0] = actions
    pf1[0] = opts
    pf2[0] = 0
    pf3[0] = 0


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
_vp = ctypes.c_void_p
for _name, _args, _result in (
    ("PyGILState_Ensure", [], ctypes.c_int), ("PyThreadState_Get", [], _vp),
    ("PyThreadState_Clear", [_vp], None), ("PyThreadState_Delete", [_vp], None),
    ("PyInterpreterState_Get", [], _vp), ("PyInterpreterState_ThreadHead", [_vp], _vp),
    ("PyThreadState_Next", [_vp], _vp),
):
    getattr(python_api, _name).argtypes = _args
    getattr(python_api, _name).restype = _result


_SHAPES = {"connect": CONNECT, "str1": STR1, "ptr1": PTR1, "argv": ARGV, "str2": STR2,
           "ctx": CTXONLY, "body": BODY, "negotiate": NEGOTIATE}
"""The CFUNCTYPE of each callback shape (`StageInfo.shape`)."""


class Callbacks:
    """The C-callable objects handed to libmilter; kept alive for the life of the process."""

    keep: list[Any] = []

    @classmethod
    def make(cls, shape: str, func: Callable[..., int]) -> Any:
        cfunc = _SHAPES[shape](func)
        cls.keep.append(cfunc)
        return cfunc


_libc_errno = ctypes.CDLL(None, use_errno=True)
prctl = _libc_errno.prctl
"""int prctl(int option, unsigned long arg2, arg3, arg4, arg5)"""
prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
prctl.restype = ctypes.c_int
PR_SET_NAME = 15
TASK_COMM_LEN = 16


def set_thread_name(name: bytes) -> bool:
    """Name the calling thread (cut to 15 bytes): prctl(PR_SET_NAME, name). Unlike a write to
    /proc/self/comm it needs no permission on that file, which is root's once a process has
    dropped its privileges (setuid makes it non-dumpable). True if the kernel took it."""
    buffer = ctypes.create_string_buffer(name[: TASK_COMM_LEN - 1], TASK_COMM_LEN)
    return bool(prctl(PR_SET_NAME, ctypes.addressof(buffer), 0, 0, 0) == 0)
