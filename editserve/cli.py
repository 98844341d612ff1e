"""The ``editserve`` command line. Each feature module contributes its subcommands.

A command module exposes ``register(subparsers)``, which adds parsers whose ``func`` takes
the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from editserve.errors import EditserveError

# Modules that add subcommands (each has `register(subparsers)`).
COMMAND_MODULES = (
    "editserve.commands.demo",
    "editserve.commands.eval",
    "editserve.commands.ledger",
    "editserve.commands.serve",
    "editserve.commands.trace",
    "editserve.commands.remote",
    "editserve.commands.candidates",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editserve", description="Live, versioned fact editing for vLLM-served models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except EditserveError as exc:
        print(f"editserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
