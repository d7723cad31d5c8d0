"""The `mmkit` command: one dispatcher, one module per command group.

Each group module (`mmkit/cli/<group>.py`) defines `register(subparsers)` and must import
only light modules at import time (heavy imports go inside the command functions), so
`mmkit --help` stays fast. A command function takes the parsed args and returns an exit
status. `MmkitError`s become one line on stderr with their exit status (2 for usage).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mmkit.errors import MmkitError, UsageError

GROUPS = ["data", "tokenizer", "train", "generate", "eval", "quickstart"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of usage + message."""

    def error(self, message: str):  # noqa: D102
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> ArgumentParser:
    from mmkit import __version__

    parser = ArgumentParser(prog="mmkit", description="Toolkit for unified multimodal models.")
    parser.add_argument("--version", action="version", version=f"mmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for group in GROUPS:
        try:
            module = importlib.import_module(f"mmkit.cli.{group}")
        except ModuleNotFoundError as e:
            if e.name == f"mmkit.cli.{group}":
                continue  # group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 2 if not argv else 0
        from mmkit.runtime import tune_cpu_allocator

        tune_cpu_allocator()  # every command trains, generates or evaluates: keep freed memory for reuse
        return int(func(args) or 0)
    except MmkitError as e:
        print(f"mmkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
