"""The `minillama` command: a table of subcommands and the functions that run them.

Each entry names the function that declares a subcommand's flags and the one that runs it; only the chosen
subcommand's module is imported. Flags of the run-time configs are generated from their dataclasses
(add_fields), so each default is stated once, in config.py. This is the one place where a user mistake
(UserError) becomes a one-line message and a non-zero exit.
"""

import argparse
import dataclasses
import importlib
import sys
import types
import typing

from minillama.config import UserError

# subcommand: (module under minillama, function declaring its flags, function running it, one-line help),
# in the order of the data flow
COMMANDS = {
    "corpus": ("data.corpus", "corpus_flags", "corpus_command", "fetch built-in corpora and describe text corpora"),
    "tokenizer": ("tokenizer.train", "tokenizer_flags", "tokenizer_command", "train a SentencePiece BPE tokenizer"),
    "train": ("train.loop", "train_flags", "train_command", "pretrain a model on a corpus (torchrun for several)"),
    "convert": ("checkpoint.load", "convert_flags", "convert_command", "convert a checkpoint to a HF folder or a GGUF"),
    "params": ("model.calc", "params_flags", "params_command", "count parameters, memory and FLOPs of a model"),
    "generate": ("infer.stream", "generate_flags", "generate_command", "complete prompts with a model"),
    "chat": ("infer.chat", "chat_flags", "chat_command", "talk to a chat model in the terminal"),
    "serve": ("serve.app", "serve_flags", "serve_command", "an OpenAI-compatible server and a chat page"),
    "eval": ("evaluate.perplexity", "eval_flags", "eval_command", "perplexity and bits per byte of a model on a text"),
    "verify": ("evaluate.verify", "verify_flags", "verify_command", "do two checkpoints agree? logits, layers, KL"),
    "ngram": ("evaluate.ngram", "ngram_flags", "ngram_command", "n-gram baseline perplexity on a run's token shards"),
    "lab": ("lab", "lab_flags", "lab_command", "experiments that show what the notes claim (none: list them)"),
    "bench": ("bench", "bench_flags", "bench_command", "speed against reference implementations, same run"),
    "quickstart": ("quickstart", "quickstart_flags", "quickstart_command", "train, sample and beat an n-gram"),
}


def function(module: str, name: str):
    return getattr(importlib.import_module(f"minillama.{module}"), name)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line naming the command and what to do, not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only`, flags for that subcommand alone (the others list their help)."""
    parser = Parser(prog="minillama", description="Llama 2 from scratch: train, run, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, flags, run, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        if only in (None, name):
            function(module, flags)(p)
        p.set_defaults(run=(module, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    try:
        return function(*args.run)(args) or 0
    except UserError as e:
        print(f"minillama {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minillama {args.command}: interrupted", file=sys.stderr)
        return 130


# ---- flags from config dataclasses ----

def add_fields(parser, cls, defaults: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` (--field-name), with its help and default from the field;
    `defaults` overrides a default for this command (chat answers longer than generate)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli", True) is False:
            continue
        meta = dict(f.metadata)
        help, flag = meta.pop("help", ""), meta.pop("flag", "--" + f.name.replace("_", "-"))
        meta.pop("cli", None)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        kind = f.type
        if isinstance(kind, types.UnionType):  # X | None: the flag takes an X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=help)
            continue
        if origin in (list, tuple):  # list: one flag, several values; tuple: a repeatable flag
            kind = typing.get_args(kind)[0]
            meta.setdefault("nargs", "+") if origin is list else meta.setdefault("action", "append")
            default = list(default) if origin is tuple else default
        shown = "" if default in (None, [], ()) or meta.get("required") else f" (default {default})"
        meta.setdefault("metavar", f.name.upper())
        parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help + shown, **meta)


def from_fields(cls, args, **extra):
    """An instance of dataclass `cls` from parsed arguments (lists become tuples where the field is one)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) and "tuple" in str(f.type) else value
    return cls(**values | extra)
