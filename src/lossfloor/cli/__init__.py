"""Command-line interface: one thin module per subcommand over the Python API.

Each subcommand module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
A ``UserError`` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lossfloor import __version__
from lossfloor.errors import UserError

SUBCOMMANDS = ["data", "estimate", "diagnose", "train", "sample", "fid"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: also one line, exit 2
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lossfloor", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lossfloor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"lossfloor.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"lossfloor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lossfloor: interrupted (finished results are kept; rerun to resume)", file=sys.stderr
        )
        return 130
