"""Generation: a KV-cache-driven generator over token ids, one pure `sample()`, and a thin text layer.

The core (`generate_ids`) prefills the left-padded prompts once, then decodes one token per step into a
preallocated `KVCache`; it never sees text. The text layer (`stream`) encodes prompts, decodes ids
incrementally so a streamed piece never splits a UTF-8 character, and checks stop strings.

Shapes: B batch (rows still generating), T prompt length after left padding, V vocabulary.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from minillama.config import UserError
from minillama.model import KVCache


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate: how many tokens, how to sample them, when to stop."""
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None = torch's global generator
    stop_ids: tuple[int, ...] = ()  # stop on these besides the tokenizer's EOS ids
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past the tokenizer's EOS ids (explicit stops still apply)

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
        ]
        for name, ok, rule in checks:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise UserError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if any(s == "" for s in self.stop_strings):
            raise UserError("stop strings must not be empty")


@dataclass
class Timing:
    """Filled in by generate_ids: real prompt tokens and decoded tokens (summed over rows), seconds."""
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


# ---- sampling: pure functions of the logits ----

def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL (Keskar et al. 2019, arXiv:1909.05858): make every already-seen token less likely by dividing
    a positive logit by `penalty` and multiplying a negative one (dividing would raise it).
    logits (B, V) float; seen (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Set to -inf every token outside the top-k, the top-p nucleus and the min-p set. logits (B, V)."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) k-th largest; ties with it stay in
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus (Holtzman et al. 2019, arXiv:1904.09751): the smallest set of most likely tokens whose
        # mass reaches top_p, i.e. keep a token while the mass of the tokens ranked above it is < top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # (B, V)
        drop_sorted = mass_above >= top_p  # the most likely token always stays (its mass_above is 0)
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        # min-p (Nguyen et al. 2024, arXiv:2407.01082): keep tokens at least min_p times as likely as the best
        probs = logits.softmax(dim=-1)
        floor = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits, params: GenerationConfig, generator: torch.Generator | None = None, seen=None):
    """Next token of each row: logits (B, V) -> ids (B,). Order: repetition penalty (over `seen`, (B, V)
    bool: each row's prompt and generated ids), then greedy argmax if temperature is 0, else temperature,
    top-k, top-p, min-p and a draw from `generator` (seeded = reproducible)."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# ---- the core generator over token ids ----

def check_prompts(prompts: list[list[int]], max_new_tokens: int, vocab_size: int, max_seq_len: int):
    if not prompts:
        raise UserError("no prompt given: pass at least one")
    for i, ids in enumerate(prompts):
        if not ids:
            raise UserError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})")
        if len(ids) >= max_seq_len:
            raise UserError(f"prompt {i} has {len(ids)} tokens but the model's context is {max_seq_len} tokens, "
                            "which leaves no room to generate: shorten the prompt")
    longest = max(len(ids) for ids in prompts)
    if longest + max_new_tokens > max_seq_len:
        raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) is past the model's "
                        f"context of {max_seq_len} tokens: use max_new_tokens <= {max_seq_len - longest}")


def left_pad(prompts: list[list[int]], device=None):
    """Right-align the prompts so every row's last real token sits in the last column: ids, mask (B, T)."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def keep_rows(cache: KVCache, index):
    """Drop finished rows from the cache (one copy per finishing event, not per token), so they stop
    costing compute. index (B_new,) = the cache rows to keep."""
    cache.k = [k[index] for k in cache.k]
    cache.v = [v[index] for v in cache.v]
    cache.mask = cache.mask[index]
    cache.positions = cache.positions[index]


def seen_tokens(ids, mask, vocab_size: int):
    """(B, V) bool: which ids occur among each row's real tokens (counted, so pads add nothing)."""
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, mask) > 0


def last_logits(model, ids, mask, cache):
    """Logits of the last column only, (B, V): the LM head over every prompt position would be wasted."""
    return model.lm_head(model.model(ids, mask, cache)[:, -1])


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], config: GenerationConfig, stop_ids=frozenset(),
                 stop_rows: set[int] | None = None, timing: Timing | None = None) -> Iterator[dict[int, int]]:
    """Yield {row: new token id} once per step for the rows still generating (row = index in `prompts`).

    A row finishes on a token in `stop_ids` (not yielded), after max_new_tokens, or when the caller adds
    it to `stop_rows` while iterating (the text layer does this for stop strings); finished rows are
    removed from the batch. Rows are left-padded, so each row's output equals generating it alone.
    """
    mc = model.config
    check_prompts(prompts, config.max_new_tokens, mc.vocab_size, mc.max_seq_len)
    stop_rows = set() if stop_rows is None else stop_rows
    timing = Timing() if timing is None else timing
    weight = model.model.embed_tokens.weight  # the model's device and dtype (an int8 head has no plain weight)
    device = weight.device
    ids, mask = left_pad(prompts, device)  # (B, T)
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
    cache = KVCache(mc, len(prompts), ids.shape[1] + config.max_new_tokens, device, weight.dtype)
    seen = seen_tokens(ids, mask, mc.vocab_size) if config.repetition_penalty != 1.0 else None
    rows = list(range(len(prompts)))  # prompt index of each cache row

    start = time.perf_counter()
    # without padding the mask says nothing: None tells the model so, and it takes the fused causal path
    logits = last_logits(model, ids, None if bool(mask.all()) else mask, cache)  # (B, V)
    next_ids = sample(logits, config, generator, seen)  # (B,)
    timing.prefill_tokens += int(mask.sum())
    timing.prefill_seconds += time.perf_counter() - start
    for step in range(config.max_new_tokens):
        tokens = next_ids.tolist()
        done = {i for i, t in enumerate(tokens) if t in stop_ids}
        emitted = {rows[i]: t for i, t in enumerate(tokens) if i not in done}
        if emitted:
            yield emitted
        done |= {i for i, row in enumerate(rows) if row in stop_rows}
        if step == config.max_new_tokens - 1 or len(done) == len(rows):
            return
        start = time.perf_counter()
        if done:
            keep = [i for i in range(len(rows)) if i not in done]
            index = torch.tensor(keep, device=device)
            keep_rows(cache, index)
            next_ids, rows = next_ids[index], [rows[i] for i in keep]
            seen = seen[index] if seen is not None else None
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        logits = last_logits(model, next_ids[:, None], None, cache)  # (B, V)
        next_ids = sample(logits, config, generator, seen)
        timing.decode_tokens += len(rows)
        timing.decode_seconds += time.perf_counter() - start


# ---- the text layer: prompts in, UTF-8-safe pieces out ----

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
    each new token's text piece as it comes; rows interleave, Piece.row tells them apart."""
    prompt_ids = [tokenizer.encode(p, special=True) if isinstance(p, str) else list(p) for p in prompts]
    stop_ids = set(config.stop_ids) | (set() if config.ignore_eos else set(tokenizer.eos_ids))
    stop_rows: set[int] = set()  # read by generate_ids after every step
    texts = [IncrementalText(tokenizer.decode, config.stop_strings) for _ in prompts]
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
        if len(c.tokens) == config.max_new_tokens and c.text == tokenizer.decode(c.tokens):
            c.finish_reason = "length"
    return completions, timing


# ---- command line: `minillama generate` (chat.py reuses the model and sampling helpers) ----

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_model_path(path: str) -> Path:
    """A model argument -> its path; `smollm2` names the SmolLM2-135M-Instruct GGUF that assets fetches."""
    if path == "smollm2":
        from minillama.assets import smollm2_gguf

        return smollm2_gguf()
    if not Path(path).exists():
        raise UserError(f"model {path!r} does not exist: give a Hugging Face folder, a .gguf file, "
                        "a Meta checkpoint or 'smollm2'")
    return Path(path)


def load_model_and_tokenizer(path: str, dtype: str = "float32", speed: str = "plain"):
    """speed: plain, or an opt-in transform from perf/: fast (fp32 matrix-vector kernel + torch.compile),
    int8 (int8 weights, bf16 activations)."""
    # imported here, not at the top: the CLI imports every stage module just to build its parser
    from minillama.checkpoint import load_model
    from minillama.tokenizer import load_tokenizer

    resolved = resolve_model_path(path)
    model = load_model(resolved, dtype=DTYPES[dtype]).eval()
    if speed == "fast":
        from minillama.perf.compile import apply_compile
        from minillama.perf.gemv import apply_fast_linear

        model = apply_compile(apply_fast_linear(model))
    elif speed == "int8":
        from minillama.perf.quantize import apply_int8

        model = apply_int8(model)
    return model, load_tokenizer(resolved)


def add_sampling_args(p, max_new_tokens: int = 256) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"tokens to generate at most (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus: smallest set with this mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens below min_p x the best one (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="CTRL penalty on seen tokens (1 = off)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the sampler, for reproducible output")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and KV cache (default float32)")
    p.add_argument("--speed", choices=["plain", "fast", "int8"], default="plain",
                   help="opt-in speed transform: fast = fp32 matrix-vector kernel + torch.compile (compiles "
                        "once, needs g++), int8 = int8 weights (default plain)")


def config_from_args(args) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop_strings=tuple(args.stop), ignore_eos=args.ignore_eos)


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


def run_generate(args):
    prompts = [parse_prompt(p) for p in args.prompts or []]
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT or --prompt-ids 1,2,3 (repeatable)")
    if args.stream and len(prompts) > 1:
        raise UserError(f"--stream prints one answer as it is written, but {len(prompts)} prompts were given: "
                        "drop --stream or give one prompt")
    config = config_from_args(args)  # validated before the (slow) load
    model, tokenizer = load_model_and_tokenizer(args.path, args.dtype, args.speed)
    if args.stream:
        timing = Timing()
        for piece in stream(model, tokenizer, prompts, config, timing):
            print(piece.text, end="", flush=True)
        print()
        print(timing_line(timing), file=sys.stderr)
        return
    completions, timing = generate(model, tokenizer, prompts, config)
    for i, c in enumerate(completions):
        if args.json:
            print(json.dumps({"prompt": c.prompt, "completion": c.text, "tokens": c.tokens,
                              "finish_reason": c.finish_reason,
                              "prefill_tokens_per_s": round(timing.prefill_tokens_per_s, 2),
                              "decode_tokens_per_s": round(timing.decode_tokens_per_s, 2)}, ensure_ascii=False))
        else:
            print(f"--- prompt {i} ---\n{c.text}" if len(completions) > 1 else c.text)
    print(timing_line(timing), file=sys.stderr)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete prompts with a model",
                              description="Complete one prompt or a batch (left-padded, one KV cache).")
    p.add_argument("path", metavar="PATH", help="Hugging Face folder, .gguf file, Meta checkpoint, or smollm2")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="prompt text (repeatable: one batch)")
    p.add_argument("--prompt-ids", dest="prompts", action="append", type=PromptIds, metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 1,2,3 (repeatable)")
    add_sampling_args(p, max_new_tokens=128)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    out.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(run=run_generate)
