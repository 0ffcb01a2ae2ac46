"""`accel` command line. Each concern registers its own subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from accel.errors import USER_ERRORS

# Modules that expose `register(subparsers)`; each adds its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "accel.commands.agent",
    "accel.commands.lab",
    "accel.commands.status",
    "accel.commands.datapath",
    "accel.commands.ca",
    "accel.commands.policy",
    "accel.commands.observe",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="meshaccel node agent and tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"accel: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
