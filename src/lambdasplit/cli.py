"""The `lambdasplit` command: a thin layer over the Python API.

Each concern registers its own sub-commands (`add_commands(subparsers)`), so this
file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "lambdasplit.client.commands",  # generate, demo
    "lambdasplit.server.commands",  # serve
    "lambdasplit.zoo.commands",  # zoo list / eval / train
    "lambdasplit.audit.commands",  # audit llm / diffusion
    "lambdasplit.diffusion.commands",  # imagine
    "lambdasplit.bench.commands",  # bench llm / overhead / diffusion
    "lambdasplit.gateway.commands",  # gateway (OpenAI-compatible API + web page)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lambdasplit", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a clear one-line error, not a traceback, for expected failures
        from lambdasplit.errors import LambdaSplitError

        if isinstance(error, LambdaSplitError):
            print(f"lambdasplit: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
