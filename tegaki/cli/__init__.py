"""The `tegaki` command: argument parsing only.

Each subcommand is one module here (`tegaki/cli/train.py`, `tegaki/cli/generate.py`, …) with a
`register(subparsers)` function; it turns flags into the library's settings objects and calls the
library. This file collects them and turns a `TegakiError` into a clear message with no traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

import tegaki
from tegaki.errors import TegakiError
from tegaki.files import explain_os_error

USER_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOENT,
}

# Each command's module, in the order `tegaki --help` lists them; each has a `register(subparsers)`.
COMMAND_MODULES = [
    "tegaki.cli.train",
    "tegaki.cli.generate",
    "tegaki.cli.params",
    "tegaki.cli.tokenizer",
    "tegaki.cli.prepare",
    "tegaki.cli.compare",
    "tegaki.cli.trace",
    "tegaki.cli.attention",
    "tegaki.cli.plot",
    "tegaki.cli.export",
    "tegaki.cli.serve",
    "tegaki.cli.chat",
    "tegaki.cli.finetune",
    "tegaki.cli.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tegaki",
        description="tegaki: an LLM written by hand in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"tegaki {tegaki.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
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
    except BrokenPipeError:
        # The reader went away (`tegaki params gpt2 | head -3`): nothing more to say, and Python's
        # own flush at exit must not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # The ones a person fixes (a full disk, a read-only or missing folder, a path that is a file),
        # from code that did not explain them itself; any other OSError is a bug and keeps its traceback.
        if e.errno not in USER_ERRNOS:
            raise
        print(
            f"tegaki {args.command}: error: {explain_os_error(e.filename or '(a file)', e, doing='use')}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"\ntegaki {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
