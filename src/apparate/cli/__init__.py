"""The `apparate` command: one subcommand per module listed in COMMANDS.

Each module has `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed arguments and returning an exit code. Modules import heavy libraries (torch,
the server) inside `func`, so `apparate --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "apparate.cli.version",
    "apparate.cli.bench",
    "apparate.cli.prepare",
    "apparate.cli.record",
    "apparate.cli.replay",
    "apparate.cli.demo",
    "apparate.cli.serve",
    "apparate.cli.loadgen",
    "apparate.cli.generate",
)


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apparate",
        description="Early-exit ML serving: answers released at confident ramps while batches run on.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"apparate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
