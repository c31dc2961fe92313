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
    "lambdasplit.gateway.commands",  # gateway (OpenAI-compatible API + web page)
    "lambdasplit.bench.commands",  # bench llm / overhead / diffusion
    "lambdasplit.llm.commands",  # check
    "lambdasplit.plan.commands",  # plan (split, codec and drafting from measured profiles)
    "lambdasplit.wire.commands",  # calibrate (tables of the cal codec)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lambdasplit", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    show_defaults(parser)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """End every option's help with its default, unless it already states one or comes from the
    environment (recursively)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not issubclass(sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
                    show_defaults(sub)
        elif (action.option_strings and action.help is not argparse.SUPPRESS and action.default is not None
              and not isinstance(action.default, bool) and action.default != argparse.SUPPRESS
              and "default" not in (action.help or "").lower()
              and "(env " not in (action.help or "")):  # a default from the environment may be a secret
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a clear one-line error, not a traceback, for expected failures
        from lambdasplit.errors import LambdaSplitError

        if isinstance(error, LambdaSplitError):  # exit codes: see lambdasplit/errors.py and the README
            print(f"lambdasplit: error: {error}", file=sys.stderr)
            return error.exit_code
        raise

if __name__ == "__main__":
    sys.exit(main())
