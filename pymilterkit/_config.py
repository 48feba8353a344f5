"""Configuration files: `pymilterkit run --config FILE.toml`.

Theory of operation
-------------------
The `run` command's argparse definition is the one list of options: every option of `run`
(a flag, or the positional `MODULE:CLASS` as key `target`) is a key of the file's top level,
spelled like the flag without its dashes (`cpu-affinity`; `cpu_affinity` is accepted too), with
the TOML type the flag's `type` implies (`int` -> integer, `float` -> number, a flag without a
value -> `true`/`false`, `choices` checked). An option added to `run` is a key at once. The
values become the parser's defaults, so a flag on the command line overrides the file.

The `[filter]` table goes to the filter class: the class declares a dataclass instance,
`config: ClassVar[MyConfig] = MyConfig()`, the table is checked against the dataclass's fields
(names, and types: str, int, float, bool, Path, Enum, Literal, `X | None`, list/tuple/set/
frozenset, dict/Mapping with str keys, nested dataclasses) and a new instance is set on the
class before anything is served (`install`), in the parent before any worker is forked.

Every mistake is a `ConfigurationError` naming the file, the key and the expected type; the
command exits 2 before anything is started. `pymilterkit._cli.load_config` (which knows the
parser) is the one entry point for a reload.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import enum
import inspect
import os
import pathlib
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._errors import ConfigurationError

__all__ = [
    "CONFIG_ATTRIBUTE",
    "config_type",
    "filter_config",
    "install",
    "parse_args",
    "read_config",
]

CONFIG_ATTRIBUTE = "config"
"""The class attribute a filter declares its configuration dataclass instance in."""
FILTER_SECTION = "filter"
_NOT_OPTIONS = frozenset({"help", "config", "handler", "command"})


# -- run options, derived from argparse -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Option:
    key: str
    action: argparse.Action

    @property
    def flag(self) -> str:
        strings = self.action.option_strings
        return max(strings, key=len) if strings else self.action.dest

    def expected(self) -> str:
        """What the key takes, in words."""
        kind = _kind(self.action)
        if kind == "bool":
            return "true or false"
        many = _many(self.action)
        one = {"int": "an integer", "float": "a number", "str": "a string"}.get(
            kind, f"a value for {self.flag}"
        )
        if self.action.choices is not None:
            one = "one of " + ", ".join(repr(c) for c in self.action.choices)
        return f"a list of {one.removeprefix('a ').removeprefix('an ')}s" if many else one

    def convert(self, value: object, where: str) -> object:
        action = self.action
        kind = _kind(action)
        if kind == "bool":
            if not isinstance(value, bool):
                raise _wrong(where, self.expected(), value)
            if isinstance(action, argparse.BooleanOptionalAction):
                return value
            const = action.const
            return const if value else (not const if isinstance(const, bool) else action.default)
        if isinstance(action, argparse._CountAction):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _wrong(where, "an integer >= 0", value)
            return value
        if _many(action):
            if not isinstance(value, list):
                raise _wrong(where, self.expected(), value)
            return [self._one(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return self._one(value, where)

    def _one(self, value: object, where: str) -> object:
        action = self.action
        kind = _kind(action)
        converted: object
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise _wrong(where, "an integer", value)
            converted = value
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _wrong(where, "a number", value)
            converted = float(value)
        elif kind == "str":
            if not isinstance(value, str):
                raise _wrong(where, "a string", value)
            converted = value
        else:  # a converter of its own (e.g. a duration or a status name): give it the text
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise _wrong(where, f"a value for {self.flag} (a string or a number)", value)
            convert = typing.cast(Callable[[str], object], action.type)
            try:
                converted = convert(str(value))
            except Exception as exc:  # noqa: BLE001 - argparse would report it as usage
                raise ConfigurationError(f"{where}: invalid value {value!r}: {exc}") from None
        if action.choices is not None and converted not in action.choices:
            raise _wrong(where, "one of " + ", ".join(repr(c) for c in action.choices), value)
        return converted


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreConstAction):
        return "bool"  # store_true, store_false, store_const: true sets it
    if action.type is None or action.type is str:
        return "str"
    if action.type is int:
        return "int"
    if action.type is float:
        return "float"
    return "custom"


def _many(action: argparse.Action) -> bool:
    nargs = action.nargs
    return (
        isinstance(action, argparse._AppendAction)  # also `extend`
        or nargs in ("+", "*")
        or (isinstance(nargs, int) and nargs > 1)
    )


def _wrong(where: str, expected: str, value: object) -> ConfigurationError:
    return ConfigurationError(f"{where}: expected {expected}, got {_toml_type(value)} {value!r}")


_TOML_TYPES = ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
               (list, "array"), (dict, "table"))  # bool first: it is an int


def _toml_type(value: object) -> str:
    return next((name for t, name in _TOML_TYPES if isinstance(value, t)), type(value).__name__)


def run_subparser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `run` subcommand's parser inside the `pymilterkit` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            run = action.choices.get("run")
            if isinstance(run, argparse.ArgumentParser):
                return run
    raise LookupError("the parser has no `run` subcommand")


def run_options(run: argparse.ArgumentParser) -> dict[str, _Option]:
    """Config key -> option, for every option of `run` (both spellings of a key)."""
    options: dict[str, _Option] = {}
    for action in run._actions:
        if action.dest in _NOT_OPTIONS or action.dest == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        longs = [s for s in action.option_strings if s.startswith("--")]
        key = longs[0][2:] if longs else action.dest
        option = _Option(key, action)
        options[key] = option
        options.setdefault(key.replace("-", "_"), option)
    return options


# -- reading a file ---------------------------------------------------------------------------


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None


def read_config(
    path: str, run: argparse.ArgumentParser
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read and check `path` against the `run` parser: (run options by argparse dest, the raw
    `[filter]` table or None). The table is checked against a class by `filter_config`.
    """
    document = _read_toml(path)
    options = run_options(run)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    section: dict[str, Any] | None = None
    for key, value in document.items():
        if key == FILTER_SECTION:
            if not isinstance(value, dict):
                raise _wrong(f"{path}: [{FILTER_SECTION}]", "a table", value)
            section = value
            continue
        option = options.get(key)
        if option is None:
            known = sorted({o.key for o in options.values()})
            raise ConfigurationError(
                f"{path}: unknown key {key!r} (run options: {', '.join(known)}; "
                f"the filter's settings go in a [{FILTER_SECTION}] table)"
            )
        dest = option.action.dest
        if dest in spelled:
            raise ConfigurationError(f"{path}: {key!r} and {spelled[dest]!r} are the same key")
        spelled[dest] = key
        values[dest] = option.convert(value, f"{path}: key {key!r}")
    return values, section


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv`; with `run --config FILE`, the file's values are the defaults of `run`.

    Options the file gives are no longer required on the command line; the parsed namespace
    carries `config_path` and `config_section` (the raw `[filter]` table) for the run command.
    """
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument("--config")
    found, _ = finder.parse_known_args(argv)
    path: str | None = found.config
    section: dict[str, Any] | None = None
    if path is not None and "run" in argv:
        run = run_subparser(parser)
        values, section = read_config(path, run)
        for action in run._actions:
            if action.dest in values:
                action.required = False
                if not action.option_strings:  # the positional MODULE:CLASS
                    action.nargs = "?"
        run.set_defaults(**values)
    args = parser.parse_args(argv)
    if path is not None and getattr(args, "command", None) == "run":
        args.config_path = path
        args.config_section = section
    return args


# -- the filter's section ---------------------------------------------------------------------


def config_type(session_class: type) -> type | None:
    """The dataclass `session_class` declares as `config`, or None if it declares none."""
    value = getattr(session_class, CONFIG_ATTRIBUTE, None)
    if value is not None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)
    for klass in session_class.__mro__:
        if CONFIG_ATTRIBUTE in inspect.get_annotations(klass):
            try:
                hint = typing.get_type_hints(klass)[CONFIG_ATTRIBUTE]
            except Exception as exc:  # noqa: BLE001 - an unresolvable annotation
                raise ConfigurationError(
                    f"{klass.__qualname__}.{CONFIG_ATTRIBUTE}: cannot resolve its type ({exc})"
                ) from None
            if typing.get_origin(hint) is typing.ClassVar:
                (hint,) = typing.get_args(hint)
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                return hint
            raise ConfigurationError(
                f"{klass.__qualname__}.{CONFIG_ATTRIBUTE} must be declared as a dataclass: "
                f"`{CONFIG_ATTRIBUTE}: ClassVar[MyConfig] = MyConfig()`, got {hint!r}"
            )
    return None


def filter_config(
    session_class: type, section: Mapping[str, Any] | None, source: str = "config"
) -> object | None:
    """The filled config of `session_class` from a `[filter]` table (None: keep its default).

    `source` names the file in errors. A class without a `config` dataclass takes no table.
    """
    cls = config_type(session_class)
    where = f"{source}: [{FILTER_SECTION}]"
    if cls is None:
        if section:
            raise ConfigurationError(
                f"{where}: {session_class.__qualname__} declares no `{CONFIG_ATTRIBUTE}` "
                f"dataclass, so it takes no settings"
            )
        return None
    if section is None:
        return None
    return _dataclass(cls, section, where, source)


def _dataclass(cls: type, table: Mapping[str, Any], where: str, source: str) -> object:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for key, value in table.items():
        field = fields.get(key)
        if field is None:
            raise ConfigurationError(
                f"{where}: unknown key {key!r} ({cls.__qualname__} has: "
                f"{', '.join(fields) or 'no settings'})"
            )
        values[key] = _value(hints[key], value, f"{where} key {key!r}", source)
    missing = [
        name for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigurationError(
            f"{where}: missing key(s) {', '.join(map(repr, missing))} "
            f"({', '.join(describe(hints[m]) for m in missing)})"
        )
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # the dataclass's own __post_init__ checks
        raise ConfigurationError(f"{where}: {exc}") from None


_NONE = type(None)
_COLLECTIONS: dict[Any, Callable[[list[Any]], Any]] = {
    list: list,
    tuple: tuple,
    set: set,
    frozenset: frozenset,
    collections.abc.Sequence: tuple,
    collections.abc.MutableSequence: list,
    collections.abc.Set: frozenset,
    collections.abc.MutableSet: set,
}


def _value(tp: Any, value: object, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Union or origin is types.UnionType:
        # TOML has no null: `X | None` takes an X (leave the key out for None).
        members = [a for a in args if a is not _NONE]
        for member in members:
            try:
                return _value(member, value, where, source)
            except ConfigurationError:
                continue
        raise _wrong(where, describe(tp), value)
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _wrong(where, describe(tp), value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, str):
            return tp(os.path.expanduser(value))
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.name or (value == member.value and not isinstance(value, bool)):
                return member
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _dataclass(tp, value, where, source)
    elif origin in _COLLECTIONS:
        if isinstance(value, list):
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(args) != len(value):
                    raise _wrong(where, describe(tp), value)
                return tuple(
                    _value(a, v, f"{where}[{i}]", source)
                    for i, (a, v) in enumerate(zip(args, value, strict=True))
                )
            item = args[0] if args else Any
            items = [_value(item, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
            return _COLLECTIONS[origin](items)
    elif origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        if isinstance(value, dict):
            key_type, item = args if args else (str, Any)
            if key_type is not str:
                raise ConfigurationError(f"{where}: only str keys can come from TOML")
            return {k: _value(item, v, f"{where}[{k!r}]", source) for k, v in value.items()}
    else:
        raise ConfigurationError(f"{where}: a field of type {describe(tp)} cannot come from TOML")
    raise _wrong(where, describe(tp), value)


def describe(tp: Any) -> str:
    """A field type in words, for error messages: `list of str`, `str | None`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(a) for a in args if a is not _NONE)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if args and args[-1] is Ellipsis:
            args = args[:1]
        return f"{name} of {', '.join(describe(a) for a in args)}" if args else name
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.name) for m in tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a table ({tp.__qualname__})"
    return getattr(tp, "__name__", repr(tp))


# -- installing ---------------------------------------------------------------------------------


def install(session_class: type, config: object | None) -> None:
    """Give `session_class` its config (None: keep the declared default), before serving.

    Checked: the class declares a `config` dataclass and `config` is an instance of it; a
    class declared without a default needs one.
    """
    cls = config_type(session_class)
    name = session_class.__qualname__
    if config is None:
        if cls is not None and not isinstance(getattr(session_class, CONFIG_ATTRIBUTE, None), cls):
            try:
                config = _dataclass(cls, {}, f"{name}.{CONFIG_ATTRIBUTE}", name)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"{exc}: give them in the [{FILTER_SECTION}] table of a config file"
                ) from None
        else:
            return
    if cls is None:
        raise ConfigurationError(
            f"config given, but {name} declares no `{CONFIG_ATTRIBUTE}: ClassVar[...]` dataclass"
        )
    if not isinstance(config, cls):
        raise ConfigurationError(
            f"config for {name} must be a {cls.__qualname__}, got {type(config).__qualname__}"
        )
    setattr(session_class, CONFIG_ATTRIBUTE, config)
