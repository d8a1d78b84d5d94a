"""Command-line interface: one thin module per subcommand over the Python API.

Each subcommand module defines ``add_parser(subparsers)`` and ``run(args) -> int``, and imports
what its command needs (torch, the API) inside ``run``: ``lossfloor <command>`` imports only
that command's module, and ``--help`` loads no torch.
A ``UserError`` anywhere becomes one line on stderr and exit code 2; a ``ParameterError`` of the
Python API is reported under the option that sets the parameter (``--<param>``, or the name a
subcommand gives in ``set_defaults(param_options={param: option})``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

from lossfloor import __version__
from lossfloor.cli.common import Invocation
from lossfloor.errors import Interrupted, ParameterError, UserError

SUBCOMMANDS = ["data", "estimate", "estimators", "diagnose", "train", "sample", "fid", "scaling",
               "floor", "schedule", "report", "encode"]  # fmt: skip


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it (says
    "default") or there is none to state (a flag, or None: the help says what happens).
    Defaults are told apart by identity, so that 0 and 0.0 (equal to False) are shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        given = all(action.default is not v for v in (None, False, argparse.SUPPRESS))
        if action.option_strings and given and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """One-line errors, and the help formatter ``_Help`` for every command."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # argparse's own errors: also one line, exit 2
        raise UserError(f"{message} (see {self.prog} --help)")  # main adds "lossfloor: error:"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; with ``only``, that subcommand's alone is built (the others
    are named, so usage and errors read the same, but their modules are not imported)."""
    parser = _Parser(prog="lossfloor", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lossfloor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in SUBCOMMANDS:
        if only is None or name == only:
            importlib.import_module(f"lossfloor.cli.{name}").add_parser(sub)
        else:
            sub.add_parser(name)
    return parser


def _option_of(parser: argparse.ArgumentParser, args: argparse.Namespace, param: str) -> str | None:
    """The option of ``args.command`` that sets the API parameter ``param``, if it has one."""
    named = getattr(args, "param_options", {}).get(param)
    option = named or "--" + param.replace("_", "-")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return option if option in sub.choices[args.command]._option_string_actions else None


def _file_backend() -> None:
    """matplotlib's Agg backend for this process, unless one is chosen already (MPLBACKEND set,
    or matplotlib imported): the CLI draws to files only. Set through the environment, so a
    command that draws nothing imports no matplotlib; the library never picks a backend, and
    its PNGs (``plots.plot_*``) use no pyplot, so they come out the same under any backend."""
    if "matplotlib" not in sys.modules:
        os.environ.setdefault("MPLBACKEND", "agg")


class _StderrLines(logging.Handler):
    """Each record's message as one line on the current ``sys.stderr`` (looked up per record,
    so that a redirected stderr, e.g. pytest's capture, gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # logging's rule: a failed emit reports itself, never raises
            self.handleError(record)


@contextlib.contextmanager
def _stderr_log(level: int) -> Iterator[None]:
    """The library's log records at ``level`` and above as stderr lines while a command runs
    (INFO: notes and progress lines; WARNING under --quiet), not passed on to the root logger
    (a program calling ``main`` that configured logging gets no second copy)."""
    logger = logging.getLogger("lossfloor")
    handler = _StderrLines()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = None
    try:
        args = parser.parse_args(argv)
        args.invocation = Invocation(["lossfloor", *argv], started)  # for with_provenance
        _file_backend()
        with _stderr_log(logging.WARNING if getattr(args, "quiet", False) else logging.INFO):
            return int(args.run(args) or 0)
    except ParameterError as exc:
        option = None if args is None else _option_of(parser, args, exc.param)
        print(f"lossfloor: error: {exc if option is None else exc.for_option(option)}",
              file=sys.stderr)  # fmt: skip
        return 2
    except UserError as exc:
        print(f"lossfloor: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"lossfloor: interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lossfloor: interrupted (outputs written before the interrupt are kept)",
              file=sys.stderr)  # fmt: skip
        return 130
