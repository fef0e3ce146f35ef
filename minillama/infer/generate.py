"""Generation over token ids: prefill the left-padded prompts once, then decode one token per step into a
KV cache (model/cache.py); it never sees text (stream.py is the text layer).

Shapes: B batch (rows still generating), T prompt length after left padding, V vocabulary.
"""

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from minillama.config import GenerationConfig, UserError
from minillama.infer.sampling import sample


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


def seen_tokens(ids, mask, vocab_size: int):
    """(B, V) bool: which ids occur among each row's real tokens (counted, so pads add nothing)."""
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, mask) > 0


def last_logits(model, ids, mask, cache):
    """Logits of the last column only, (B, V): the LM head over every prompt position would be wasted."""
    return model.logits(model.hidden_states(ids, mask, cache)[:, -1])


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], config: GenerationConfig, stop_ids=frozenset(),
                 stop_rows: set[int] | None = None, timing: Timing | None = None) -> Iterator[dict[int, int]]:
    """Yield {row: new token id} once per step for the rows still generating (row = index in `prompts`).

    A row finishes on a token in `stop_ids` (not yielded), after max_new_tokens, or when the caller adds
    it to `stop_rows` while iterating (the text layer does this for stop strings); finished rows are
    removed from the batch. Rows are left-padded, so each row's output equals generating it alone.
    """
    mc = model.config
    # a bounded cache (--window, StreamingLLM) generates past the context: only the prompt must fit it
    check_prompts(prompts, config.max_new_tokens if config.window is None else 0, mc.vocab_size, mc.max_seq_len)
    stop_rows = set() if stop_rows is None else stop_rows
    timing = Timing() if timing is None else timing
    T = max(len(p) for p in prompts)
    cache = model.new_cache(len(prompts), T + config.max_new_tokens, config.window, config.sink_tokens)
    device = cache.device
    ids, mask = left_pad(prompts, device)  # (B, T)
    generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
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
            cache.keep_rows(index)  # finished rows stop costing compute
            next_ids, rows = next_ids[index], [rows[i] for i in keep]
            seen = seen[index] if seen is not None else None
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        logits = last_logits(model, next_ids[:, None], None, cache)  # (B, V)
        next_ids = sample(logits, config, generator, seen)
        timing.decode_tokens += len(rows)
        timing.decode_seconds += time.perf_counter() - start
