"""The `workbench` command line.

Each command lives in its own module (`workbench.cli.<command>`: `add_parser` and `run`); this module builds the
parser and turns the errors a user can fix (`workbench.errors.UserError`) into one line and exit status 2. Any other
exception is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import sys

from workbench import __version__
from workbench.cli import analyze, apply, export, layers, recipe, report, train, tune
from workbench.cli.common import EXIT_USER_ERROR, Parser, UsageError
from workbench.errors import is_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="workbench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (layers, recipe, export, apply, train, tune, analyze, report):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `workbench` command line; returns the exit status.

    A `UserError` (a bad option, a missing model, a recipe naming unknown layers) becomes one line on stderr and
    exit status 2. Any other exception propagates with its traceback (a bug; exit status 1 from Python).
    """
    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        command = args.command
        args.func(args)
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        prog = err.prog if isinstance(err, UsageError) else f"workbench {command}"
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
