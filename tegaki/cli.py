"""The `tegaki` command.

Each subcommand lives next to the code it drives (training in `train.py`, sampling in
`generate.py`, …) and exposes `register(subparsers)`; this file only collects them and turns a
`TegakiError` into a clear message with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tegaki.errors import TegakiError

# Modules that provide a `register(subparsers)` function, in the order `tegaki --help` lists them.
COMMAND_MODULES = [
    "tegaki.train",
    "tegaki.generate",
    "tegaki.analysis.params",
    "tegaki.tokenizer.cli",
    "tegaki.data",
    "tegaki.analysis.compare",
    "tegaki.analysis.trace",
    "tegaki.analysis.attention",
    "tegaki.analysis.plot",
    "tegaki.hf",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tegaki",
        description="tegaki: an LLM written by hand in PyTorch.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command is not written yet
                continue
            raise
        if hasattr(module, "register"):
            module.register(subparsers)
    parser.commands = subparsers.choices  # name -> that command's own parser
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # complain with the subcommand's usage, not the top-level one
        command_parser = parser.commands.get(getattr(args, "command", None) or "", parser)
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except TegakiError as e:
        print(f"tegaki {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ntegaki {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
