"""The `pymilterkit` command: run or drive a milter, replay recordings, show versions.

Also `python -m pymilterkit`. Exit codes: 0 success; 1 the milter failed or a message was
refused/failed (`send`); 2 bad usage or configuration (argparse's convention); 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import itertools
import json
import logging
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._config import add_run_arguments, filter_config, read_config
from ._config import parse_args as parse_args_with_config
from ._errors import ConfigurationError, MilterError
from ._fresh import ENV as FRESH_ENV
from ._logging import configure as configure_logging
from ._logging import formatter
from ._logsafe import escape_control
from ._options import LOG_LEVELS, RunOptions, log_level, run_flags
from ._session import MilterSession
from ._version import __version__

if TYPE_CHECKING:
    from ._runner import Milter
    from ._serve import Server

__all__ = ["fresh_worker", "load_config", "load_session_class", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
_MAX_MESSAGE = 300
"""Characters of an exception's message shown in a one-line error."""


def load_session_class(target: str) -> type[MilterSession]:
    """Import `MODULE:CLASS` (or `path/to/file.py:CLASS`) and check it is a MilterSession."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"expected MODULE:CLASS, got {target!r}")
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ConfigurationError(f"no such filter file: {module_name} (in {os.getcwd()})")
        spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(path))[0], path
        )
        if spec is None or spec.loader is None:
            raise ConfigurationError(f"cannot load {module_name!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[spec.name]
            raise _import_failed(module_name, exc) from exc
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
                raise _import_failed(module_name, exc) from exc  # one of its own imports
            raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
        except Exception as exc:
            raise _import_failed(module_name, exc) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"{module_name} has no {attr!r}{_did_you_mean(part, obj)}"
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, MilterSession)):
        raise ConfigurationError(f"{target} is not a MilterSession subclass")
    return obj


def _import_failed(module_name: str, exc: Exception) -> ConfigurationError:
    """Importing the filter's module raised: a usage error (exit 2, which the shipped unit does
    not restart) naming the file and line it was raised at and the exception, in one line. The
    whole traceback is logged at DEBUG (`main`)."""
    if isinstance(exc, SyntaxError):
        where, line, message = exc.filename, exc.lineno, exc.msg
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if not f.filename.startswith("<frozen ")]
        where, line = (frames[-1].filename, frames[-1].lineno) if frames else (None, None)
        message = str(exc)
    at = f" ({where}, line {line})" if where else ""
    text = escape_control(f"{type(exc).__name__}: {message}")
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + f"... ({len(text)} characters)"
    return ConfigurationError(f"cannot import {module_name!r}{at}: {text}")


def _did_you_mean(name: str, namespace: object) -> str:
    """"; did you mean 'X'?" for the MilterSession classes (or else names) close to `name`."""
    names = [n for n in dir(namespace) if not n.startswith("_")]
    classes = [n for n in names if isinstance(getattr(namespace, n, None), type)
               and issubclass(getattr(namespace, n), MilterSession)
               and getattr(namespace, n) is not MilterSession]
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.75) or (
        difflib.get_close_matches(name, names, n=1, cutoff=0.75))
    if close:
        return f"; did you mean {close[0]!r}?"
    if classes:
        return f"; its MilterSession classes: {', '.join(sorted(classes))}"
    return ""


def load_config(
    path: str, session_class: type[MilterSession] | None = None
) -> tuple[dict[str, Any], object | None]:
    """Read and check config file `path`: (its `run` options by argparse dest, filter config).

    The filter config is the filled dataclass of `session_class` (default: the file's
    `target`), or None when the file has no `[filter]` table (the class keeps its default).
    The one call a reload needs; raises `ConfigurationError` naming the file, key and type.
    """
    options, section = read_config(path)
    if session_class is None:
        target = options.get("target")
        if target is None:
            if section:
                raise ConfigurationError(f"{path}: a [filter] table needs a `target` key")
            return options, None
        session_class = load_session_class(target)
    return options, filter_config(session_class, section, path)


def filter_packages(session_class: type) -> list[str]:
    """The top-level packages (or script modules) of the filter's classes, its mixins too."""
    packages: list[str] = []
    for klass in session_class.__mro__:
        top = klass.__module__.partition(".")[0]
        if top not in ("pymilterkit", "builtins", "typing", "abc") and top not in packages:
            packages.append(top)
    return packages


def follow_log_level(session_class: type, level: str) -> None:
    """The filter's own loggers (`logging.getLogger(__name__)` in its package) log at the
    `pymilterkit` level, not the root's: a filter's INFO shows by default, a library's does
    not. A level the filter's package set for itself is kept."""
    for package in filter_packages(session_class):
        logger = logging.getLogger(package)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def build_milter(args: argparse.Namespace) -> Milter:
    """The `Milter` a parsed `run` command line describes (also a reload's fresh worker)."""
    from ._runner import Milter

    session_class = load_session_class(args.target)
    follow_log_level(session_class, getattr(args, "run_log_level", None) or args.log_level)
    path = getattr(args, "config_path", None)
    config = filter_config(session_class, args.config_section, path) if path else None
    options = RunOptions.from_args(args, config)
    milter = Milter(session_class, options.socket, **options.keywords())
    milter.cli_argv = getattr(args, "pmk_argv", None)
    return milter


def _cmd_run(args: argparse.Namespace) -> int:
    build_milter(args).run()
    return EXIT_OK


def _cmd_version(args: argparse.Namespace) -> int:
    from ._runner import libmilter_version

    print(f"pymilterkit {__version__}")
    try:
        print("libmilter {}.{}.{}".format(*libmilter_version()))
    except MilterError as exc:
        print(f"libmilter: not available ({exc})")
        return EXIT_FAILED
    return EXIT_OK


Handler = Callable[[argparse.Namespace], int]

_SEND_DOC = """drive a running milter like an MTA and show what it answered.

    pymilterkit send --socket unix:/run/f.sock --from a@example.net --to b@example.org msg.eml

MESSAGE may be a file (`-` for standard input), a directory (every regular file in it, sorted)
or an mbox file (detected by its first line, `From `). Each message goes over its own milter
connection. With one message the whole conversation is printed: the negotiation, each stage's
answer and every modification. With several, one line per message (everything with
`--verbose`), a progress indicator on standard error, and a summary at the end. `--json`
prints one JSON document instead (see docs/testing.md for its shape).

Exit status: 0 every message would be delivered (CONTINUE or ACCEPT); 1 at least one was
rejected, tempfailed or discarded, or the milter failed (could not connect, timed out, closed
the connection, broke the protocol); 2 bad usage (argparse) or an unreadable message source.
"""


def _cmd_send(args: argparse.Namespace) -> int:
    # The testing kit is imported only when `send` runs: `run` never loads it.
    from .testing._send import cmd_send

    return cmd_send(args)


def _add_send_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doc = "`pymilterkit send`: " + _SEND_DOC
    parser = subparsers.add_parser(
        "send",
        help="drive a running milter like an MTA and show its answers",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 2)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("messages", nargs="+", metavar="MESSAGE",
                        help="message file, '-', a directory or an mbox")
    parser.add_argument("--socket", required=True,
                        help="the milter: unix:/path, inet:PORT@HOST, inet6:PORT@[::1]")
    parser.add_argument("--from", dest="sender", default="sender@example.net",
                        help="envelope sender (default sender@example.net)")
    parser.add_argument("--from-params", dest="sender_params", default="",
                        help="ESMTP parameters of MAIL FROM, e.g. 'BODY=8BITMIME'")
    parser.add_argument("--to", action="append", required=True,
                        help="envelope recipient (repeat for more)")
    parser.add_argument("--client-host", default="mail.example.net",
                        help="client host name given at connect")
    parser.add_argument("--client-addr", default="192.0.2.10",
                        help="client IP address, a /path for a unix client, or 'unknown'")
    parser.add_argument("--client-port", type=int, default=41234)
    parser.add_argument("--helo", default="mail.example.net", help="HELO name ('' for none)")
    parser.add_argument("--unknown", action="append", default=[], metavar="COMMAND",
                        help="an unknown SMTP command to report after HELO (repeatable)")
    parser.add_argument("--macro", action="append", default=[], metavar="STAGE:NAME=VALUE",
                        help="a macro to send, stage connect/helo/mail/rcpt/data/eoh/eom")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each answer (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="with several messages, print every conversation")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress indicator")
    parser.add_argument("--diff", action="store_true",
                        help="print a unified diff of the message against the delivered one")
    parser.set_defaults(handler=_cmd_send)


def _cmd_replay(args: argparse.Namespace) -> int:
    from .testing import Harness, MilterClient
    from .testing._recording import cmd_replay

    if args.socket is not None:
        return cmd_replay(args, MilterClient(args.socket, timeout=args.timeout))
    session_class = load_session_class(args.filter)
    if args.config is not None:
        from ._config import install

        install(session_class, load_config(args.config, session_class)[1])
    with Harness(session_class) as harness:
        return cmd_replay(args, harness)


def _add_replay_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "replay", help="play recordings (--record) again and show what changed",
        description="Play recorded connections again, with their macros and stage order, "
        "against a running milter or a filter class in this process; print each message's "
        "recorded and new verdict and modifications, then a summary. Exit 0 when nothing "
        "changed, 1 when something changed or failed.")
    parser.add_argument("recordings", nargs="+", metavar="FILE_OR_DIR",
                        help="*.milterlog files, or directories of them")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket", help="a running milter: unix:/path, inet:PORT@HOST")
    target.add_argument("--filter", metavar="MODULE:CLASS", help="a filter class, in process")
    parser.add_argument("--config", metavar="FILE.toml", help="with --filter: its [filter] table")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="with --socket: seconds to wait for each answer (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(handler=_cmd_replay)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pymilterkit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=LOG_LEVELS,
        type=log_level,
        help="log level of the pymilterkit loggers and the filter's own package (default INFO; "
        "others: --root-log-level)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a filter class on a socket")
    run.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read options (keys named like the flags) and the [filter] table from a TOML "
        "file; flags override it",
    )
    add_run_arguments(run, run_flags())
    run.set_defaults(handler=_cmd_run)

    version = sub.add_parser("version", help="show pymilterkit and libmilter versions")
    version.set_defaults(handler=_cmd_version)

    _add_send_command(sub)
    _add_replay_command(sub)
    return parser


def _configure_logging(args: argparse.Namespace, *, force: bool = False) -> None:
    configure_logging(
        getattr(args, "run_log_level", None) or args.log_level,
        log_format=getattr(args, "log_format", "text"),
        syslog=getattr(args, "syslog", False),
        root_level=getattr(args, "root_log_level", "WARNING"),
        force=force,
    )


def milter_for_reload(argv: Sequence[str]) -> Milter:
    """In a reload's fresh worker: the command line parsed again, the config file read again,
    logging set up as they now say, the filter class imported anew."""
    args = parse_args_with_config(_parser(), list(argv))
    args.pmk_argv = list(argv)
    _configure_logging(args, force=True)  # it logged as the supervisor does until now
    return build_milter(args)


def fresh_worker() -> None:
    """A fresh worker process (started by `_fresh.Recipe.spawn` at reload): import the session
    class afresh, build the same `Milter`, serve as one worker on the inherited listening
    descriptor; never returns."""
    from . import _metrics
    from ._runner import Milter, claim_run, plan_cpus, serve_worker

    description = json.loads(os.environ.pop(FRESH_ENV))
    sys.path[:] = description["path"]
    if description.get("cwd"):
        os.chdir(description["cwd"])
    if "argv" not in description:  # else the command line sets logging up itself
        logging.basicConfig(
            level=description.get("log_level", logging.INFO),
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
    elif description.get("logging"):  # an error in the config file read again is logged so
        configure_logging(**description["logging"])
    slot = description["slot"]

    def server() -> Server:
        _metrics.attach(description.get("metrics"))  # the supervisor's counts, if metered
        if "argv" in description:
            milter = milter_for_reload(description["argv"])
        else:
            options = pickle.loads(bytes.fromhex(description["options"]))
            session_class = load_session_class(description["target"])
            milter = Milter(session_class, options.socket, **options.keywords())
        claim_run(milter)
        if "cpus" in description:  # the supervisor's plan
            cpus = description["cpus"]
            return milter.filter().server(slot, None if cpus is None else set(cpus))
        planned = plan_cpus(milter.options)  # a supervisor of an older pymilterkit
        return milter.filter().server(slot, None if planned is None else planned[slot])

    serve_worker(server, description["fd"], description["control"], description["parent"])


def _json_requested(argv: Sequence[str]) -> bool:
    """`--log-format json` on the command line (known before the config file is read)."""
    return "--log-format=json" in argv or any(
        a == "--log-format" and b == "json" for a, b in itertools.pairwise(argv)
    )


def _say_error(exc: BaseException, as_json: bool) -> None:
    """The one line a failed command ends with: JSON like every other line, with
    `--log-format json`."""
    if as_json:
        record = logging.LogRecord("pymilterkit", logging.ERROR, __file__, 0, "error: %s",
                                   (exc,), None)
        print(formatter("json").format(record), file=sys.stderr)
    else:
        print(f"pymilterkit: error: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pymilterkit` command; returns the exit code."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = _json_requested(argv)
    try:
        args = parse_args_with_config(parser, argv)
    except ConfigurationError as exc:
        _say_error(exc, as_json)
        return EXIT_USAGE
    args.pmk_argv = argv  # a reload's fresh workers parse it (and the config file) again
    handler: Handler = args.handler
    try:
        _configure_logging(args)
        return handler(args)
    except MilterError as exc:
        if exc.__cause__ is not None:  # e.g. the traceback of the filter module's import
            logging.getLogger("pymilterkit").debug("%s; how:", exc, exc_info=exc.__cause__)
        _say_error(exc, getattr(args, "log_format", "text") == "json")
        return EXIT_USAGE if isinstance(exc, ConfigurationError) else EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`pymilterkit send --json DIR | head`): no traceback, and none
        # from the interpreter's final flush of stdout either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
