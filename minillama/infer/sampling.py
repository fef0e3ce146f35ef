"""Sampling: the next token from the logits, as pure functions (no model, no state but an optional seeded
generator). Order: repetition penalty, then greedy argmax at temperature 0, else temperature, top-k,
top-p, min-p, and a draw."""

import torch

from minillama.config import GenerationConfig


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
