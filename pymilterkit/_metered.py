"""The metered stage callback: the plain one of `_dispatch`, with the counting compiled in.

Theory of operation
-------------------
With `metrics`, every answer of a reply-giving stage is timed and counted in the shared map
(`_metrics`). A wrapper around each stage's callback costs a Python call per command on top of
the counting; so the metered callback is derived, once per process, from the source of
`SessionRules.stage_callback` itself: the same function, compiled again with its inner
`callback` reading the clock on entry and, at each of its `return`s, counting the answer (the
statements of `_COUNT`) before returning it. Nothing is copied by hand, so the metered callback
cannot drift from the plain one, and the plain one is untouched: without metrics it costs
nothing. The derived code runs with `_dispatch`'s globals and keeps its line numbers, so its
tracebacks point at `_dispatch.py`.

`derive()` returns None when the source cannot be read (an installation without `.py` files)
or no longer has that shape (no inner `def callback`, a `return` inside a `try` body, whose
handler would catch a failed count); `MeteredRules` then wraps the callback
(`Recorder.timed`), which counts the same. A test checks that the derivation works.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
from collections.abc import Callable
from typing import Any

from . import _dispatch

__all__ = ["METER_NAMES", "derive", "wrap"]

logger = logging.getLogger("pymilterkit")

METER_NAMES = ("cells", "first", "total", "fast", "bounds", "stride", "where", "clock")
"""What `_pmk_meter` (the derived function's extra keyword argument) holds, in this order: the
shared cells, the stage's first-bucket cell by status value, its latency sum's cell, the upper
bound of the first bucket, all bounds, the distance between two buckets' cells,
`bisect.bisect_left` and `time.perf_counter`."""

_UNPACK = f"({', '.join(f'_pmk_{n}' for n in METER_NAMES)},) = _pmk_meter"
_START = "_pmk_start = _pmk_clock()"
# At each return of the inner callback: the answer's status and latency bucket in one addition
# (most stages end within the first bucket: no search), the latency sum in another. Under the
# GIL neither can interleave with another thread's (see `_metrics.Recorder`); `derive` is only
# used on GIL builds.
_COUNT = """
_pmk_answer = _PMK_VALUE
try:
    _pmk_elapsed = _pmk_clock() - _pmk_start
    if _pmk_elapsed <= _pmk_fast:
        _pmk_cells[_pmk_first[_pmk_answer]] += 1.0
    else:
        _pmk_bucket = _pmk_where(_pmk_bounds, _pmk_elapsed)
        _pmk_cells[_pmk_first[_pmk_answer] + _pmk_bucket * _pmk_stride] += 1.0
    _pmk_cells[_pmk_total] += _pmk_elapsed
except Exception:  # nothing may reach C; a count is not worth it
    pass
return _pmk_answer
"""


# The wrapper, for when the callback cannot be compiled again (see `wrap`): its returns are
# counted by the same transformation. libmilter's callbacks take 1 to 3 arguments: passing them
# by name, not as *args, spares a tuple and a generic call per stage.
_WRAPPER = f"""
def wrap(callback, _pmk_meter, _pmk_no_arg):
    {_UNPACK}

    def metered(key, a=_pmk_no_arg, b=_pmk_no_arg, *more):
        {_START}
        if a is _pmk_no_arg:
            return callback(key)
        if b is _pmk_no_arg:
            return callback(key, a)
        if not more:
            return callback(key, a, b)
        return callback(key, a, b, *more)

    return metered
"""
_NO_ARG = object()


class _Shape(Exception):
    """The source no longer has the shape the derivation expects."""


class _CountReturns(ast.NodeTransformer):
    """Every `return X` of one function (not of functions nested in it) counts X first."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return node  # a nested function's returns are its own

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        return node

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        return node

    def visit_Try(self, node: ast.Try) -> ast.AST:
        if any(isinstance(n, ast.Return) for stmt in node.body for n in ast.walk(stmt)):
            raise _Shape("a return inside a try body")
        return self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> list[ast.stmt]:
        if node.value is None:
            raise _Shape("a bare return")
        statements = ast.parse(_COUNT).body
        for statement in statements:  # the counting shows as the return's line
            for child in ast.walk(statement):
                ast.copy_location(child, node)
        assign = statements[0]
        assert isinstance(assign, ast.Assign)
        assign.value = node.value
        return statements


def _transform(tree: ast.Module) -> ast.Module:
    outer = tree.body[0]
    if not isinstance(outer, ast.FunctionDef) or outer.name != "stage_callback":
        raise _Shape("no def stage_callback")
    inner = [
        n for n in outer.body if isinstance(n, ast.FunctionDef) and n.name == "callback"
    ]
    if len(inner) != 1:
        raise _Shape("no single inner def callback")
    callback = inner[0]
    _CountReturns().generic_visit(callback)
    start = ast.parse(_START).body[0]
    ast.copy_location(start, callback.body[0])
    callback.body.insert(0, start)
    outer.decorator_list = []
    outer.args.kwonlyargs.append(ast.arg(arg="_pmk_meter"))
    outer.args.kw_defaults.append(None)
    unpack = ast.parse(_UNPACK).body[0]
    ast.copy_location(unpack, outer.body[0])
    has_doc = isinstance(outer.body[0], ast.Expr) and isinstance(
        getattr(outer.body[0], "value", None), ast.Constant
    )
    outer.body.insert(1 if has_doc else 0, unpack)
    ast.fix_missing_locations(tree)
    return tree


def _counted_wrapper() -> Callable[..., Callable[..., int]]:
    tree = ast.parse(_WRAPPER)
    outer = tree.body[0]
    assert isinstance(outer, ast.FunctionDef)
    inner = outer.body[1]
    assert isinstance(inner, ast.FunctionDef)
    _CountReturns().generic_visit(inner)
    ast.fix_missing_locations(tree)
    namespace: dict[str, Any] = {}
    exec(compile(tree, "<pymilterkit._metered>", "exec"), namespace)
    made: Callable[..., Callable[..., int]] = namespace["wrap"]
    return made


_wrap = _counted_wrapper()


def wrap(callback: Callable[..., int], meter: tuple[Any, ...]) -> Callable[..., int]:
    """`callback` (a stage's, with its arguments) counting its answers and timing them as the
    compiled-in counting does; `meter`: see `METER_NAMES`. For GIL builds."""
    return _wrap(callback, meter, _NO_ARG)


def derive() -> Callable[..., Callable[..., int]] | None:
    """`SessionRules.stage_callback` with counting compiled into its inner callback, taking
    one more keyword argument, `_pmk_meter` (see `METER_NAMES`); None if it cannot be made."""
    plain = _dispatch.SessionRules.stage_callback
    try:
        lines, first = inspect.getsourcelines(plain)
        filename = inspect.getsourcefile(plain) or "<pymilterkit._dispatch>"
        tree = _transform(ast.parse(textwrap.dedent("".join(lines))))
        ast.increment_lineno(tree, first - 1)
        code = compile(tree, filename, "exec")
    except (OSError, TypeError, SyntaxError, _Shape) as exc:
        logger.debug("metrics: stage callbacks wrapped, not compiled in (%s)", exc)
        return None
    namespace: dict[str, Any] = {}
    exec(code, vars(_dispatch), namespace)  # defines the function, with _dispatch's globals
    derived: Callable[..., Callable[..., int]] = namespace["stage_callback"]
    return derived
