"""`pymilterkit run --config FILE.toml`: run options and the filter's typed `[filter]` table."""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from examples.routing import Routing, RoutingConfig
from pymilterkit import ConfigurationError, Milter, MilterSession, Status
from pymilterkit.__main__ import _parser, load_config, main
from pymilterkit._config import (
    add_run_arguments,
    filter_config,
    install,
    parse_args,
    read_config,
    run_options,
)
from pymilterkit._options import Flag, run_flags
from pymilterkit._security import _gid, _uid
from pymilterkit.testing import Harness, RecipientAdded

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "milter.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def restore_routing() -> Iterator[None]:
    saved = Routing.__dict__["config"]
    yield
    Routing.config = saved


# -- run options ------------------------------------------------------------------------------


def run_subparser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    assert isinstance(run, argparse.ArgumentParser)
    return run


def test_every_run_flag_is_a_config_key() -> None:
    run = run_subparser(_parser())
    flags = {
        s[2:]
        for action in run._actions
        for s in action.option_strings
        if s.startswith("--") and s not in ("--help", "--config")
    }
    keys = {o.key for o in run_options().values()}
    assert flags <= keys
    assert "target" in keys  # the positional MODULE:CLASS
    assert "config" not in keys and "help" not in keys


def test_values_become_defaults_and_flags_override_them(tmp_path: Path) -> None:
    path = write(tmp_path, 'target = "examples.routing:Routing"\nsocket = "unix:/tmp/x.sock"\n'
                 'workers = 3\ncpu_affinity = "none"\nerror-status = "reject"\n')
    args = parse_args(_parser(), ["run", "--config", path, "--workers", "2"])
    assert args.target == "examples.routing:Routing"
    assert args.socket == "unix:/tmp/x.sock"  # --socket no longer required
    assert args.workers == 2  # the flag wins
    assert args.cpu_affinity == "none"
    assert args.error_status == "reject"
    assert args.config_path == path and args.config_section is None
    assert parse_args(_parser(), ["run", "--config", path, "other:Class"]).target == "other:Class"


def test_users_and_groups_by_name_or_id_from_flags_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'target = "examples.routing:Routing"\nsocket = "unix:/tmp/x.sock"\n'
                 'user = 65534\ngroup = "nogroup"\nsocket-group = 0\n')
    args = parse_args(_parser(), ["run", "--config", path])
    assert (args.user, args.group, args.socket_group) == ("65534", "nogroup", "0")
    args = parse_args(_parser(), ["run", "--config", path, "--user", "nobody", "--group", "0"])
    assert (args.user, args.group) == ("nobody", "0")
    # resolved by name first, then as an id (as chown does)
    assert _uid("0") == (0, 0) == _uid(0) and _uid("root") == (0, 0)
    assert _gid("0") == 0 and _gid("root") == 0
    with pytest.raises(ConfigurationError, match="unknown user 'no-such-user-x'"):
        _uid("no-such-user-x")
    for odd in ("\u00b2", "\u0663", "99999999999999999999"):  # not ids as chown reads them
        with pytest.raises(ConfigurationError, match="unknown group"):
            _gid(odd)


def test_log_levels_are_taken_in_any_case(tmp_path: Path) -> None:
    path = write(tmp_path, 'target = "examples.routing:Routing"\nsocket = "unix:/tmp/x.sock"\n'
                 'root-log-level = "error"\n')
    args = parse_args(_parser(), ["--log-level", "debug", "run", "--config", path,
                                  "--log-level", "Warning"])
    assert (args.log_level, args.run_log_level, args.root_log_level) == (
        "DEBUG", "WARNING", "ERROR")
    with pytest.raises(ConfigurationError, match="not a log level: 'loud'"):
        parse_args(_parser(), ["run", "--config",
                               write(tmp_path, 'root-log-level = "loud"\n', "bad.toml")])


def test_an_option_missing_from_file_and_flags_is_still_required(tmp_path: Path) -> None:
    path = write(tmp_path, 'target = "examples.routing:Routing"\n')
    with pytest.raises(SystemExit) as exc:
        parse_args(_parser(), ["run", "--config", path])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("wokers = 2\n", ["unknown key 'wokers'", "workers"]),
        ('workers = "2"\n', ["key 'workers'", "expected an integer", "string '2'"]),
        ("workers = true\n", ["key 'workers'", "expected an integer", "boolean"]),
        ("socket = 3\n", ["key 'socket'", "expected a string"]),
        ('error-status = "maybe"\n', ["key 'error-status'", "one of 'tempfail'"]),
        ('log-level = "loud"\n', ["key 'log-level'", "not a log level: 'loud'"]),
        ('workers = 2\nworkers_ = 1\n', ["unknown key 'workers_'"]),
        ("workers = 2\n[filter]\nx = 1\n[other]\n", ["unknown key 'other'"]),
        ("filter = 3\n", ["[filter]", "expected a table"]),
        ("workers = \n", ["not valid TOML"]),
    ],
)
def test_mistakes_name_the_file_the_key_and_the_type(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as exc:
        read_config(path)
    message = str(exc.value)
    assert message.startswith(path)
    for word in words:
        assert word in message


def test_both_spellings_of_one_key_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "cpu-affinity = 'none'\ncpu_affinity = 'auto'\n")
    with pytest.raises(ConfigurationError, match="same key"):
        read_config(path)


def test_an_unreadable_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        read_config(str(tmp_path / "missing.toml"))


def test_options_added_to_run_later_become_keys(tmp_path: Path) -> None:
    """What other options will look like: a float, a flag, a converter of its own."""

    def status(text: str) -> Status:
        return Status[text.upper()]

    flags = (
        *run_flags(),
        Flag("--future-timeout", "", dest="future_timeout", type=float),
        # (--dry-run, a flag, and --metrics, a string, are real options of run)
        Flag("--color", "", dest="color", switch=True, default=False),
        Flag("--future-status", "", dest="future_status", type=status, default=Status.TEMPFAIL),
    )
    parser = _parser()
    add_run_arguments(run_subparser(parser), flags[len(run_flags()):])
    path = write(tmp_path, 'socket = "unix:/x"\ntarget = "m:C"\nfuture-timeout = 5\n'
                 "dry-run = true\ncolor = true\nfuture-status = 'reject'\n"
                 "metrics = '127.0.0.1:9100'\n")
    args = parse_args(parser, ["run", "--config", path], flags)
    assert args.future_timeout == 5.0 and isinstance(args.future_timeout, float)
    assert args.dry_run is True and args.color is True
    assert args.metrics == "127.0.0.1:9100"
    assert args.future_status is Status.REJECT
    bad = write(tmp_path, "future-status = 'sometimes'\n", "bad.toml")
    with pytest.raises(ConfigurationError, match="key 'future-status': invalid value"):
        read_config(bad, flags)
    bad = write(tmp_path, "dry-run = 'yes'\n", "bad2.toml")
    with pytest.raises(ConfigurationError, match="key 'dry-run': expected true or false"):
        read_config(bad, flags)


def test_main_refuses_a_bad_file_with_exit_2_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "never.sock"
    path = write(tmp_path, f'target = "examples.routing:Routing"\nsocket = "unix:{sock}"\n'
                 "[filter]\ndrop_local_parts = 'noreply'\n")
    assert main(["run", "--config", path]) == 2
    err = capsys.readouterr().err
    assert path in err and "drop_local_parts" in err and "frozenset of str" in err
    assert not sock.exists()
    path = write(tmp_path, "workers = 'many'\n", "b.toml")
    assert main(["run", "--config", path, "examples.routing:Routing", "--socket", "unix:/x"]) == 2
    assert "key 'workers': expected an integer" in capsys.readouterr().err


# -- the filter's section ---------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Limits:
    per_hour: int = 100


@dataclasses.dataclass(frozen=True)
class AllKinds:
    name: str
    ratio: float = 0.5
    enabled: bool = True
    spool: Path = Path("/var/spool/x")
    color: Color = Color.RED
    mode: Literal["strict", "lax"] = "lax"
    reply: str | None = None
    servers: tuple[str, ...] = ()
    ports: list[int] = dataclasses.field(default_factory=list)
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    limits: Limits = Limits()


class Typed(MilterSession):
    config: ClassVar[AllKinds]  # no default: a config file must give `name`


def test_a_table_fills_every_kind_of_field(tmp_path: Path) -> None:
    section = {
        "name": "x", "ratio": 2, "enabled": False, "spool": "/tmp/s", "color": "blue",
        "mode": "strict", "reply": "550 no", "servers": ["a", "b"], "ports": [25, 587],
        "weights": {"a": 1, "b": 0.5}, "limits": {"per_hour": 7},
    }
    config = filter_config(Typed, section, "f.toml")
    assert config == AllKinds(
        "x", 2.0, False, Path("/tmp/s"), Color.BLUE, "strict", "550 no", ("a", "b"), [25, 587],
        {"a": 1.0, "b": 0.5}, Limits(7),
    )


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"name": "x", "nmae": "y"}, ["unknown key 'nmae'", "name, ratio"]),
        ({"name": 3}, ["key 'name'", "expected str", "integer 3"]),
        ({"name": "x", "ratio": "high"}, ["key 'ratio'", "expected float"]),
        ({"name": "x", "enabled": 1}, ["key 'enabled'", "expected bool"]),
        ({"name": "x", "color": "green"}, ["key 'color'", "one of 'RED', 'BLUE'"]),
        ({"name": "x", "mode": "loose"}, ["key 'mode'", "one of 'strict', 'lax'"]),
        ({"name": "x", "servers": ["a", 1]}, ["key 'servers'[1]", "expected str"]),
        ({"name": "x", "weights": {"a": "b"}}, ["key 'weights'['a']", "expected float"]),
        ({"name": "x", "limits": {"per_day": 1}}, ["unknown key 'per_day'", "per_hour"]),
        ({}, ["missing key(s) 'name'", "(str)"]),
    ],
)
def test_table_mistakes_name_file_key_and_type(
    section: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as exc:
        filter_config(Typed, section, "f.toml")
    message = str(exc.value)
    assert message.startswith("f.toml: [filter]")
    for word in words:
        assert word in message


def test_a_class_without_config_takes_no_table() -> None:
    class Plain(MilterSession):
        pass

    assert filter_config(Plain, None, "f.toml") is None
    with pytest.raises(ConfigurationError, match="declares no `config`"):
        filter_config(Plain, {"x": 1}, "f.toml")
    with pytest.raises(ConfigurationError, match="declares no `config"):
        install(Plain, RoutingConfig())


def test_a_config_without_a_default_is_required_at_start() -> None:
    with pytest.raises(ConfigurationError, match=r"missing key.*'name'.*config file"):
        Milter(Typed, "unix:/tmp/never.sock")


def test_the_example_runs_on_its_defaults_and_on_its_example_file(
    restore_routing: None,
) -> None:
    assert Routing.config == RoutingConfig()
    options, config = load_config(str(ROOT / "examples" / "routing.toml"))
    assert options["target"] == "examples.routing:Routing"
    assert isinstance(config, RoutingConfig)
    assert config.archive["orders@example.com"] == "archive@example.com"
    assert "mailer-daemon" in config.drop_local_parts
    Milter(Routing, "unix:/tmp/never.sock", config=config)
    assert Routing.config is config  # on the class before anything is served or forked
    result = Harness(Routing).run(b"Subject: x\r\n\r\nbody\r\n", recipients=["orders@example.com"])
    assert result.modifications == (RecipientAdded("<archive@example.com>", None),)


def test_milter_refuses_a_config_of_another_type(restore_routing: None) -> None:
    with pytest.raises(ConfigurationError, match="must be a RoutingConfig"):
        Milter(Routing, "unix:/tmp/never.sock", config=AllKinds("x"))
    assert Routing.config == RoutingConfig()


def test_load_config_without_target_or_table(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 2\n")
    assert load_config(path) == ({"workers": 2}, None)
    path = write(tmp_path, "[filter]\nx = 1\n", "t.toml")
    with pytest.raises(ConfigurationError, match="needs a `target`"):
        load_config(path)
    with pytest.raises(ConfigurationError, match="unknown key 'x'"):
        load_config(path, Typed)


def test_every_setting_of_run_has_its_own_dest() -> None:
    args = parse_args(_parser(), ["run", "m:C", "--socket", "unix:/x", "--log-format", "json"])
    assert (args.log_format, args.syslog, args.root_log_level) == ("json", False, "WARNING")
    dests = [flag.dest for flag in run_flags()]
    assert all(dests) and len(set(dests)) == len(dests)
