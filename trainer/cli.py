"""`cairl` command line: parses arguments and calls library functions; user mistakes exit without tracebacks.

Each subcommand lives in its own module under `trainer/commands/` exposing `register(subparsers)`,
which adds a parser whose `handler` default takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from models.errors import UserError
from trainer.runtime import set_cpu_xla_flags

# Subcommand modules, in the order `cairl --help` lists them.
COMMANDS = (
    "trainer.commands.fetch_model",
    "trainer.commands.generate",
    "trainer.commands.export",
    "trainer.commands.train",
    "trainer.commands.eval",
    "trainer.commands.plan",
    "trainer.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cairl", description="Constitutional AI training in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_cpu_xla_flags()  # before any command touches a JAX device
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"cairl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cairl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
