"""Configuration files: `pymilterkit run --config FILE.toml`.

Each setting of `run` (a `_options.Flag`, or `target` for the positional `MODULE:CLASS`) is a
top-level key spelled like the flag without dashes (`cpu-affinity` or `cpu_affinity`), with the
TOML type its flag implies. A flag on the command line wins, then the file, then the default.
The `[filter]` table is checked against the dataclass the filter class declares as `config`
(`config: ClassVar[MyConfig] = MyConfig()`) and a new instance is set on the class before
anything is served (`install`). Every mistake is a `ConfigurationError` naming the file, key
and expected type; the command exits 2 before anything starts.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import enum
import inspect
import os
import pathlib
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._errors import ConfigurationError
from ._options import Flag, run_flags

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


# -- run options, from the `Flag`s of `_options` -----------------------------------------------


def _expected(flag: Flag) -> str:
    """What the key of `flag` takes, in words."""
    if flag.switch:
        return "true or false"
    if flag.choices is not None:
        return "one of " + ", ".join(repr(c) for c in flag.choices)
    words: dict[object, str] = {int: "an integer", float: "a number", None: "a string"}
    return words.get(flag.type, f"a value for {flag.flag} (a string or a number)")


def _convert(flag: Flag, value: object, where: str) -> object:
    """The value of `flag` that the TOML `value` gives, as the command line would give it."""
    if flag.append and flag.type is not None:  # a number, or a table of KEY = number
        items = value.items() if isinstance(value, dict) else [(None, value)]
        if any(isinstance(v, bool) or not isinstance(v, int | float) for _, v in items):
            raise _wrong(where, "a number or a table of numbers", value)
        one = dataclasses.replace(flag, append=False)
        return [_convert(one, v if k is None else f"{k}={v}", where) for k, v in items]
    if flag.switch:
        ok = isinstance(value, bool)
    elif flag.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif flag.type is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif flag.type is None:
        ok = isinstance(value, str)
    else:  # a converter of its own (e.g. a duration): give it the text
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _wrong(where, _expected(flag), value)
        try:
            return flag.type(str(value))
        except Exception as exc:  # noqa: BLE001 - argparse would report it as usage
            raise ConfigurationError(f"{where}: invalid value {value!r}: {exc}") from None
    if not ok or (flag.choices is not None and value not in flag.choices):
        raise _wrong(where, _expected(flag), value)
    return value


def _wrong(where: str, expected: str, value: object) -> ConfigurationError:
    return ConfigurationError(f"{where}: expected {expected}, got {_toml_type(value)} {value!r}")


_TOML_TYPES = ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"),
               (list, "array"), (dict, "table"))  # bool first: it is an int


def _toml_type(value: object) -> str:
    return next((name for t, name in _TOML_TYPES if isinstance(value, t)), type(value).__name__)


def run_options(flags: Sequence[Flag] | None = None) -> dict[str, Flag]:
    """Config key -> flag, for every setting of `run` (both spellings of a key)."""
    options: dict[str, Flag] = {}
    for flag in run_flags() if flags is None else flags:
        options[flag.key] = flag
        options.setdefault(flag.key.replace("-", "_"), flag)
    return options


def add_run_arguments(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Add `flags` to the `run` parser, with no defaults: `parse_args` fills in what neither
    the command line nor a config file gave."""
    for flag in flags:
        names = [flag.flag] if flag.flag else [flag.dest]
        kwargs: dict[str, Any] = {"help": flag.help, "default": argparse.SUPPRESS}
        if flag.flag:
            kwargs["dest"] = flag.dest
        else:
            kwargs["nargs"] = "?"
        if flag.switch:
            kwargs["action"] = "store_true"
        else:
            if flag.append:
                kwargs["action"] = "append"
            kwargs.update(type=flag.type, choices=flag.choices, metavar=flag.metavar)
        parser.add_argument(*names, **kwargs)


# -- reading a file ---------------------------------------------------------------------------


MAX_CONFIG_BYTES = 1024 * 1024
"""A config file is a page of settings: anything bigger is a mistake (or `/dev/zero`)."""


def _bounded(text: object, limit: int = 300) -> str:
    shown = str(text)
    return shown if len(shown) <= limit else shown[:limit] + f"... ({len(shown)} characters)"


def _read_toml(path: str) -> dict[str, Any]:
    """The TOML document in `path`: a regular file of at most `MAX_CONFIG_BYTES` of UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from None
    # Checked before fdopen, which refuses a directory with an IsADirectoryError of its own.
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigurationError(f"config file {path} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigurationError(
            f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB"
        )
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"{path}: not UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {_bounded(exc)}") from None
    except RecursionError:
        raise ConfigurationError(f"{path}: nested too deeply") from None


def read_config(
    path: str, flags: Sequence[Flag] | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read and check `path` against the settings of `run`: (values by argparse dest, the raw
    `[filter]` table or None). The table is checked against a class by `filter_config`.
    """
    document = _read_toml(path)
    options = run_options(flags)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    section: dict[str, Any] | None = None
    for key, value in document.items():
        if key == FILTER_SECTION:
            if not isinstance(value, dict):
                raise _wrong(f"{path}: [{FILTER_SECTION}]", "a table", value)
            section = value
            continue
        flag = options.get(key)
        if flag is None:
            known = sorted({o.key for o in options.values()})
            raise ConfigurationError(
                f"{path}: unknown key {key!r} (run options: {', '.join(known)}; "
                f"the filter's settings go in a [{FILTER_SECTION}] table)"
            )
        if flag.dest in spelled:
            raise ConfigurationError(f"{path}: {key!r} and {spelled[flag.dest]!r} are the same key")
        spelled[flag.dest] = key
        values[flag.dest] = _convert(flag, value, f"{path}: key {key!r}")
    return values, section


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str], flags: Sequence[Flag] | None = None
) -> argparse.Namespace:
    """Parse `argv`; for `run`, each setting comes from the command line, else from the
    `--config` file, else its default; one missing from all is a usage error.

    The parsed namespace carries `config_path` and `config_section` (the raw `[filter]` table)
    for the run command.
    """
    args = parser.parse_args(argv)
    if getattr(args, "command", None) != "run":
        return args
    path: str | None = getattr(args, "config", None)
    values, section = read_config(path, flags) if path is not None else ({}, None)
    missing = []
    for flag in run_flags() if flags is None else flags:
        if hasattr(args, flag.dest):
            continue
        if flag.dest in values:
            setattr(args, flag.dest, values[flag.dest])
        elif flag.required:
            missing.append(flag.flag or flag.metavar or flag.dest)
        else:
            setattr(args, flag.dest, flag.default)
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
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
    return _dataclass(cls, section, where)


def _dataclass(cls: type, table: Mapping[str, Any], where: str) -> object:
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
        values[key] = _value(hints[key], value, f"{where} key {key!r}")
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


def _value(tp: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Union or origin is types.UnionType:
        # TOML has no null: `X | None` takes an X (leave the key out for None).
        members = [a for a in args if a is not _NONE]
        for member in members:
            try:
                return _value(member, value, where)
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
            return _dataclass(tp, value, where)
    elif origin in _COLLECTIONS:
        if isinstance(value, list):
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(args) != len(value):
                    raise _wrong(where, describe(tp), value)
                return tuple(
                    _value(a, v, f"{where}[{i}]")
                    for i, (a, v) in enumerate(zip(args, value, strict=True))
                )
            item = args[0] if args else Any
            items = [_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
            return _COLLECTIONS[origin](items)
    elif origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        if isinstance(value, dict):
            key_type, item = args if args else (str, Any)
            if key_type is not str:
                raise ConfigurationError(f"{where}: only str keys can come from TOML")
            return {k: _value(item, v, f"{where}[{k!r}]") for k, v in value.items()}
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
                config = _dataclass(cls, {}, f"{name}.{CONFIG_ATTRIBUTE}")
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
