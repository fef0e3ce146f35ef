"""The text layer of generation: prompts in, UTF-8-safe pieces out, stop strings, and `minillama generate`.

`stream` encodes prompts, runs generate.generate_ids and decodes ids incrementally, so a streamed piece
never splits a UTF-8 character and never shows the start of a stop string that may yet complete.
"""

import json
import sys
from dataclasses import dataclass, field
from typing import Iterator

from minillama.config import GenerationConfig, UserError
from minillama.infer.generate import Timing, generate_ids


class IncrementalText:
    """One row's detokenizer. Each step decodes all the ids so far, not the new id alone (which loses the
    spaces and byte merges that depend on neighbours), so the pieces concatenate to decode(ids) for any
    tokenizer whose decoding only grows as ids are appended; it releases only new text that is final:
    not ending in U+FFFD (the first bytes of a character still being generated), and not a possible
    start of a stop string. On a stop string the text ends just before it."""

    def __init__(self, decode, stop_strings=()):
        self.decode, self.stop_strings = decode, tuple(stop_strings)
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already released
        self.stopped = False  # a stop string was found

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        hits = [i for i in (text.find(s, self.emitted) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            return self.release(text, min(hits))
        return self.release(text, len(text) - self.held_back(text))

    def held_back(self, text: str) -> int:
        """Length of the longest unreleased suffix of `text` that a stop string starts with."""
        if not self.stop_strings:
            return 0
        for n in range(len(text) - self.emitted, 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def release(self, text: str, end: int) -> str:
        piece = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def finish(self) -> str:
        """The held-back rest, once the row has ended without a stop string."""
        return "" if self.stopped else self.release(self.decode(self.ids), sys.maxsize)


@dataclass
class Piece:
    row: int  # index of the prompt
    token: int | None  # the generated id; None for held-back text released when generation ends
    text: str  # may be "" (the token ends inside a character or may start a stop string)


@dataclass
class Completion:
    prompt: str | list[int]
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # stop (EOS, stop id or stop string) | length (max_new_tokens)


def stream(model, tokenizer, prompts: list[str | list[int]], config: GenerationConfig,
           timing: Timing | None = None) -> Iterator[Piece]:
    """Generate for a batch of prompts (text, encoded with the tokenizer's default BOS, or ids) and yield
    each new token's text piece as it comes; rows interleave, Piece.row tells them apart. Without a
    tokenizer (a checkpoint that has none) prompts must be ids and the pieces carry ids only."""
    if tokenizer is None:
        if any(isinstance(p, str) for p in prompts) or config.stop_strings:
            raise UserError("this model has no tokenizer files: give prompts as token ids (--prompt-ids) "
                            "and no stop strings")
        eos = model.config.eos_token_id
        eos_ids, decode = set(eos if isinstance(eos, tuple) else [eos]) - {None}, lambda ids: ""
    else:
        eos_ids, decode = tokenizer.eos_ids, tokenizer.decode
    prompt_ids = [tokenizer.encode(p, special=True) if isinstance(p, str) else list(p) for p in prompts]
    stop_ids = set(config.stop_ids) | (set() if config.ignore_eos else set(eos_ids))
    stop_rows: set[int] = set()  # read by generate_ids after every step
    texts = [IncrementalText(decode, config.stop_strings) for _ in prompts]
    for step in generate_ids(model, prompt_ids, config, stop_ids, stop_rows, timing):
        for row, token in step.items():
            piece = texts[row].add(token)
            if texts[row].stopped:
                stop_rows.add(row)
            yield Piece(row, token, piece)
    for row, text in enumerate(texts):
        tail = text.finish()
        if tail:
            yield Piece(row, None, tail)


def generate(model, tokenizer, prompts: list[str | list[int]], config: GenerationConfig):
    """Non-streaming: collect list(stream(...)) per prompt. Returns ([Completion], Timing)."""
    timing = Timing()
    completions = [Completion(p) for p in prompts]
    for piece in list(stream(model, tokenizer, prompts, config, timing)):
        completions[piece.row].text += piece.text
        if piece.token is not None:
            completions[piece.row].tokens.append(piece.token)
    for c in completions:  # ran to the limit, and its text was not cut at a stop string
        if len(c.tokens) == config.max_new_tokens and (tokenizer is None or c.text == tokenizer.decode(c.tokens)):
            c.finish_reason = "length"
    return completions, timing


# ---- command line: `minillama generate` ----

def timing_line(timing: Timing) -> str:
    return (f"prefill {timing.prefill_tokens} tok | {timing.prefill_tokens_per_s:.1f} tok/s | "
            f"decode {timing.decode_tokens} tok | {timing.decode_tokens_per_s:.1f} tok/s")


class PromptIds(str):
    """A --prompt-ids argument, kept apart from --prompt text in the one ordered list of prompts."""


def parse_prompt(prompt: str) -> str | list[int]:
    if not isinstance(prompt, PromptIds):
        return prompt
    try:
        return [int(x) for x in prompt.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids {prompt!r}: give comma-separated integers, e.g. 1,2,3") from None


def generate_flags(p) -> None:
    from minillama.checkpoint.load import model_flags
    from minillama.cli import add_fields

    model_flags(p)
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="prompt text (repeatable: one batch)")
    p.add_argument("--prompt-ids", dest="prompts", action="append", type=PromptIds, metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)")
    add_fields(p, GenerationConfig, defaults={"max_new_tokens": 128})
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    out.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def generate_command(args) -> None:
    from minillama.checkpoint.load import load_from_flags
    from minillama.cli import from_fields

    prompts = [parse_prompt(p) for p in args.prompts or []]
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT or --prompt-ids 1,2,3 (repeatable)")
    if args.stream and len(prompts) > 1:
        raise UserError(f"--stream prints one answer as it is written, but {len(prompts)} prompts were given: "
                        "drop --stream or give one prompt")
    config = from_fields(GenerationConfig, args)  # validated before the (slow) load
    only_ids = all(isinstance(p, list) for p in prompts)  # ids need no tokenizer
    model, tokenizer = load_from_flags(args, tokenizer_required=not only_ids)
    if args.stream:
        timing = Timing()
        for piece in stream(model, tokenizer, prompts, config, timing):
            print(piece.text if tokenizer else f"{piece.token} ", end="", flush=True)
        print()
        print(timing_line(timing), file=sys.stderr)
        return
    completions, timing = generate(model, tokenizer, prompts, config)
    for i, c in enumerate(completions):
        if args.json:
            print(json.dumps({"prompt": c.prompt, "completion": c.text if tokenizer else None, "tokens": c.tokens,
                              "finish_reason": c.finish_reason,
                              "prefill_tokens_per_s": round(timing.prefill_tokens_per_s, 2),
                              "decode_tokens_per_s": round(timing.decode_tokens_per_s, 2)}, ensure_ascii=False))
            continue
        text = c.text if tokenizer else ",".join(map(str, c.tokens))  # no tokenizer: the ids
        print(f"--- prompt {i} ---\n{text}" if len(completions) > 1 else text)
    print(timing_line(timing), file=sys.stderr)
