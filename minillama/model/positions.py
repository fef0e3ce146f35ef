"""Where tokens are, for attention, when plain RoPE is not enough: ALiBi's linear bias, ReRoPE's clipped
distances, frequencies that change with the length, and a cache that moves positions.

Plain RoPE with fixed frequencies stays in llama.py: rotate q and k once, cache the rotated keys, run the
fused kernel. Everything here needs keys placed at attention time, so the cache keeps them as projected
and each step rotates them where they are now:
- a SinkCache (model/cache.py) renumbers positions inside the cache when old tokens leave;
- ReRoPE needs each key rotated two ways;
- dynamic NTK and longrope change every frequency as the sequence grows.
Rotating S cached keys per step costs O(S·D) per layer, what attention itself costs.

Length-dependent frequencies and causality. transformers gives every token of a forward pass the
frequencies of the pass's whole length, so a token's logits change when tokens are appended after it, and
cached decoding (keys rotated at the frequencies of their own step) disagrees with recomputing
(transformers issue #25104). Caching keys unrotated fixes the first layer only: deeper layers' keys come
from hidden states computed at older frequencies. What is exact is causality: the query of a token at
position p uses the frequencies of a (p + 1)-token sequence, for itself and for every key it reads. A
prefill past the trained length rotates the keys once per run of queries with the same frequencies (for
dynamic NTK, once per query: attend_in_runs), a decode step once. Cached decoding then equals
recomputing, in every layer.

A Positions is built once per forward pass and used by every layer.
Shapes: B batch, T new tokens, S key slots (past + new), H heads, K kv heads, G = H/K, D head dim.
"""

import math

import torch

from minillama.config import ModelConfig
from minillama.model.rope import LENGTH_DEPENDENT, apply_rope, frequencies, rotation


class Positions:
    """The positions of queries and keys, and what each position encoding makes of them."""

    def __init__(self, config: ModelConfig, keys, T: int):
        """keys (B, S) bool: which key slots (the cache's past, then the T new ones) hold real tokens."""
        # a position counts real tokens, as in llama.rotary_positions; in a SinkCache, those it holds
        self.k_pos = (keys.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        self.q_pos = self.k_pos[:, -T:]  # (B, T)
        self.slopes = self.window = None
        if config.position_encoding == "alibi":
            self.slopes = alibi_slopes(config.n_heads).to(keys.device)  # (H,)
            return
        self.theta, self.scale = query_frequencies(config, self.q_pos)
        if self.theta.dim() == 3:  # queries with different frequencies: keys rotated once for each
            self.runs = runs_of_equal_frequencies(self.theta)
            return
        self.q_rot = _rotation(self.theta, self.q_pos, self.scale)  # (cos, sin) (B, 1, T, D)
        self.k_rot = _rotation(self.theta, self.k_pos, self.scale)  # (B, 1, S, D)
        s = config.rope_scaling
        if s is not None and s.type in ("rerope", "leaky_rerope"):
            # ReRoPE (Su 2023, "Rectified Rotary Position Embeddings"): relative position t = i - j is used as
            # it is below the window w, and past it becomes w (ReRoPE) or w + (t - w)/k (leaky ReRoPE).
            # Rotating q to i/k + w(1 - 1/k) and k to j/k gives exactly w + (t - w)/k; k = inf gives w.
            k = s.factor if s.type == "leaky_rerope" else math.inf
            self.window = s.window
            self.q_far = _rotation(self.theta, self.q_pos / k + s.window * (1 - 1 / k), self.scale)
            self.k_far = _rotation(self.theta, self.k_pos / k, self.scale)

    def attend(self, q, k, v, mask, attention):
        """q (B, H, T, D), k/v (B, K, S, D) as projected; mask (B, 1, T, S) bool; attention the kernel
        (q, k, v, mask) -> (B, H, T, D) to run, fused or the reference."""
        if self.slopes is not None:
            return attention(q, k, v, self.alibi_bias(mask, q.dtype))
        if self.theta.dim() == 3:
            return self.attend_in_runs(q, k, v, mask, attention)
        near_q, near_k = apply_rope(q, *self.q_rot), apply_rope(k, *self.k_rot)
        if self.window is None:
            return attention(near_q, near_k, v, mask)
        far_q, far_k = apply_rope(q, *self.q_far), apply_rope(k, *self.k_far)
        near = (self.q_pos[:, :, None] - self.k_pos[:, None, :] < self.window)[:, None, None]  # (B, 1, 1, T, S)
        # ReRoPE's two passes (Su's reference code): scores with both rotations, chosen per pair
        return softmax_values(torch.where(near, scores(near_q, near_k), scores(far_q, far_k)), v, mask)

    def attend_in_runs(self, q, k, v, mask, attention):
        """Attention for queries with different frequencies: for each run of queries that share theirs,
        the keys rotated at those frequencies and plain attention (so one rotation of S keys per run)."""
        out = []
        for start, end in self.runs:
            theta = self.theta[:, start]  # (B, D/2)
            q_run = apply_rope(q[:, :, start:end], *_rotation(theta, self.q_pos[:, start:end], self.scale))
            k_run = apply_rope(k, *_rotation(theta, self.k_pos, self.scale))
            out.append(attention(q_run, k_run, v, mask[:, :, start:end]))  # (B, H, end - start, D)
        return torch.cat(out, dim=2)

    def alibi_bias(self, mask, dtype):
        """(B, H, T, S) float: -slope · distance where attending is allowed, -inf elsewhere."""
        distance = self.q_pos[:, None, :, None] - self.k_pos[:, None, None, :]  # (B, 1, T, S)
        bias = -self.slopes[None, :, None, None] * distance  # (B, H, T, S)
        return bias.masked_fill(~mask, float("-inf")).to(dtype)


def _rotation(theta, positions, scale):
    cos, sin = rotation(theta, positions, scale)  # (B, T, D)
    return cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): one rotation for every head


def query_frequencies(config: ModelConfig, q_pos):
    """θ and the attention factor: (D/2,) for all; for the length-dependent types, the frequencies of each
    query's own length p + 1: (B, D/2) when a row's queries share them, else (B, T, D/2)."""
    s = config.rope_scaling
    if s is None or s.type not in LENGTH_DEPENDENT:
        return frequencies(config)
    lengths = q_pos + 1  # (B, T)
    known = {n: frequencies(config, n) for n in lengths.unique().tolist()}
    theta = torch.stack([known[n][0] for n in lengths.flatten().tolist()]).view(*lengths.shape, -1)
    scale = known[lengths[0, 0].item()][1]  # the attention factor does not depend on the length
    return (theta[:, -1] if bool((theta == theta[:, -1:]).all()) else theta), scale


def scores(q, k):
    """q·kᵀ with query heads grouped onto their kv head: q (B, H, T, D), k (B, K, S, D) -> (B, K, G, T, S)."""
    B, H, T, D = q.shape
    K = k.shape[1]
    return q.view(B, K, H // K, T, D) @ k.unsqueeze(2).transpose(-1, -2)


def runs_of_equal_frequencies(theta) -> list[tuple[int, int]]:
    """[(start, end)]: the stretches of consecutive queries whose frequencies theta (B, T, D/2) agree in
    every row (past the trained length, dynamic NTK changes them at every position)."""
    changes = (theta[:, 1:] != theta[:, :-1]).any(-1).any(0).nonzero().flatten() + 1  # (runs - 1,)
    bounds = [0, *changes.tolist(), theta.shape[1]]
    return list(zip(bounds, bounds[1:]))


def softmax_values(s, v, mask):
    """softmax(s / sqrt(D) where mask allows) · v: s (B, K, G, T, S), v (B, K, S, D), mask (B, 1, T, S)
    -> (B, H, T, D): the explicit attention of ReRoPE, whose scores come from two rotations."""
    B, K, G, T, S = s.shape
    s = (s / math.sqrt(v.shape[-1])).float().masked_fill(~mask.unsqueeze(1), float("-inf"))  # (B, K, G, T, S)
    y = s.softmax(dim=-1).to(v.dtype) @ v.unsqueeze(2)  # (B, K, G, T, D)
    return y.view(B, K * G, T, -1)


def alibi_slopes(n_heads: int):
    """ALiBi's head slopes (Press et al. 2021, arXiv:2108.12409, section 3): the geometric sequence that
    starts at 2^(-8/n) with that ratio; for n not a power of 2, the sequence of the power just below, then
    every other slope of the one just above."""
    def geometric(n):
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    power = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(geometric(power) + geometric(2 * power)[0::2][:n_heads - power])  # (H,)
