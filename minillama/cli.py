"""The `minillama` command. Each stage module defines `add_commands(subparsers)`, which adds its
subcommands with `set_defaults(run=function)`; this file is the table of those modules and the one
place where a user mistake (UserError) becomes a one-line message and a non-zero exit."""

import argparse
import importlib
import sys

from minillama.config import UserError

# stage modules that add subcommands, in the order of the data flow
MODULES = [
    "corpus",
    "tokenizer_train",
    "train",
    "checkpoint",
    "calc",
    "generate",
    "chat",
    "evaluate",
    "ngram",
    "bench",
    "quickstart",
]


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line naming the command and what to do, not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minillama", description="Llama 2 from scratch: train, run, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(f"minillama.{name}").add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as e:
        print(f"minillama {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minillama {args.command}: interrupted", file=sys.stderr)
        return 130
