"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, section 2.1): every head's keys and values
are computed from one small latent vector per token, c = norm(W_dkv · x) of width R (kv_lora_rank), plus
a rotary key part k_rope of width Dr that all heads share. The cache keeps only those: R + Dr numbers per
token and layer (512 + 64 in DeepSeek-V2), where multi-head attention keeps 2·H·D (2·128·128 there).

Shapes: B batch, T new tokens, S keys (past + new), C width, H heads, R latent width, Dn and Dr the
position-free and the rotary part of a query/key head, Dv a value head.

Two forms of the same function:
  plain     expand the latents into per-head keys and values (kv_b_proj), then ordinary attention;
  absorbed  fold kv_b_proj's key half into the queries and its value half into the output, so the heads
            attend over the latents themselves: multi-query attention with one (R + Dr)-wide key per token
            and the latent as its value (DeepSeek-V3's inference/model.py, attn_impl = "absorb").
The plain form is cheaper when many queries share the keys (training, prefill), the absorbed one when few
do (decoding); `LatentAttention.absorb` picks by the arithmetic, and a test shows the two agree.

Module names are transformers' DeepseekV2Attention ones: q_proj (or q_a_proj, q_a_layernorm, q_b_proj),
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minillama.config import ModelConfig
from minillama.model.cache import KVCache
from minillama.model.llama import RMSNorm, reference_attention, scaled_dot_product_attention

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm and kv_a_layernorm use RMSNorm's default, not rms_norm_eps


class LatentAttention(nn.Module):
    """DeepSeek-V2's attention, (B, T, C) -> (B, T, C), with the interface of llama.Attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, H = config.dim, config.n_heads
        self.n_heads, self.rank = H, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        q_out, q_rank = H * (self.nope_dim + self.rope_dim), config.q_lora_rank
        if q_rank is None:
            self.q_proj = nn.Linear(C, q_out, bias=False)
        else:  # queries through a bottleneck too (DeepSeek-V2, not -Lite): fewer weights, same cache
            self.q_a_proj = nn.Linear(C, q_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(q_rank, q_out, bias=False)
        self.low_rank_q = q_rank is not None
        # "with_mqa": the latent and the one rotary key all heads share, as in multi-query attention
        self.kv_a_proj_with_mqa = nn.Linear(C, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, C, bias=False)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5  # a query·key product spans Dn + Dr dimensions
        self.use_sdpa = True  # False selects reference_attention
        self.absorb = None  # True/False forces a form; None: the one with fewer FLOPs for the shapes at hand

    def forward(self, x, rope, mask, cache=None, layer=0):
        """x (B, T, C); rope: (cos, sin) (B, 1, T, Dr), never a Positions (the config refuses position
        encodings that place keys at attention time: the cache keeps them rotated in the latent rows);
        mask (B, 1, T, S) bool, True = may attend, or None = causal."""
        B, T, _ = x.shape
        cos, sin = rope
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.low_rank_q else self.q_proj(x)
        q = q.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, Dn + Dr)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)  # (B, H, T, Dr)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)  # (B, T, R), (B, T, Dr)
        k_rope = apply_rope_interleaved(k_rope.unsqueeze(1), cos, sin).squeeze(1)  # (B, T, Dr)
        kv = torch.cat([self.kv_a_layernorm(latent), k_rope], dim=-1)  # (B, T, R + Dr): all the cache keeps
        if cache is not None:
            kv = cache.write(layer, kv)  # (B, S, R + Dr): the past and the new
        absorb = self.absorb if self.absorb is not None else self.absorbed_is_cheaper(T, kv.shape[1])
        y = (self.absorbed if absorb else self.plain)(q_nope, q_rope, kv, mask)  # (B, H, T, Dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def _attend(self, q, k, v, mask):
        attend = scaled_dot_product_attention if self.use_sdpa else reference_attention
        return attend(q, k, v, mask, self.scale)

    def plain(self, q_nope, q_rope, kv, mask):
        """Up-project every key's latent to H heads' keys and values, then attend as usual."""
        B, H, T, _ = q_nope.shape
        S = kv.shape[1]
        latent, k_rope = kv.split([self.rank, self.rope_dim], dim=-1)  # (B, S, R), (B, S, Dr)
        kv_heads = self.kv_b_proj(latent).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, Dn + Dv)
        k_nope, v = kv_heads.split([self.nope_dim, self.v_dim], dim=-1)  # (B, H, S, Dn), (B, H, S, Dv)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, H, S, self.rope_dim)], dim=-1)  # (B, H, S, Dn + Dr)
        # values zero-padded to the keys' width: PyTorch's fused CPU kernel needs equal widths, and without it
        # falls back to one that keeps the (T, S) scores (2x slower at 2k tokens)
        narrow = self.nope_dim + self.rope_dim - self.v_dim
        v = F.pad(v, (0, narrow)) if narrow > 0 else v  # (B, H, S, Dn + Dr)
        return self._attend(torch.cat([q_nope, q_rope], dim=-1), k, v, mask)[..., :self.v_dim]  # (B, H, T, Dv)

    def absorbed(self, q_nope, q_rope, kv, mask):
        """q_nope · (W_k c) = (W_kᵀ q_nope) · c and Σ p·(W_v c) = W_v (Σ p·c): move the up-projection from
        the S keys to the T queries and outputs, and attend over the latents as one shared kv head."""
        w = self.kv_b_proj.weight.to(q_nope.dtype)  # (a no-op unless the weights are stored narrower: bf16)
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.rank)  # (H, Dn + Dv, R)
        w_k, w_v = w.split([self.nope_dim, self.v_dim], dim=1)  # (H, Dn, R), (H, Dv, R)
        q = torch.cat([q_nope @ w_k, q_rope], dim=-1)  # (B, H, T, Dn) @ (H, Dn, R) -> (B, H, T, R + Dr)
        keys = kv.unsqueeze(1)  # (B, 1, S, R + Dr): latent and rope key, one kv head for all H
        # the values are the latents; passing the whole row and dropping the rope part of the output keeps
        # keys and values equally wide, which PyTorch's fused CPU kernel needs (else a slow fallback that
        # copies the shared head H times)
        y = self._attend(q, keys, keys, mask)[..., :self.rank]  # (B, H, T, R): a mix of latents per head
        return y @ w_v.transpose(1, 2)  # (B, H, T, R) @ (H, R, Dv) -> (B, H, T, Dv)

    def absorbed_is_cheaper(self, T: int, S: int) -> bool:
        """Multiply-adds per batch row of the two forms, for T queries over S keys."""
        H, R, Dn, Dr, Dv = self.n_heads, self.rank, self.nope_dim, self.rope_dim, self.v_dim
        plain = S * R * H * (Dn + Dv) + 2 * H * T * S * max(Dn + Dr, Dv)  # expand S latents, then attend
        absorbed = H * T * R * (Dn + Dv) + 2 * H * T * S * (R + Dr)  # fold into T queries, attend in R + Dr
        return absorbed < plain


def apply_rope_interleaved(x, cos, sin):
    """Rotary embedding on adjacent pairs (x[2i], x[2i+1]), the layout DeepSeek's weights expect (Meta's
    original RoPE; transformers computes it with complex numbers). x (B, heads, T, Dr); cos/sin
    (B, 1, T, Dr) in the rotate-half layout of rope.py, whose first half holds each pair's angle once."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # (B, 1, T, Dr/2)
    even, odd = x.float().unflatten(-1, (half, 2)).unbind(-1)  # (B, heads, T, Dr/2) each
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # (B, heads, T, Dr/2, 2)
    return rotated.flatten(-2).to(x.dtype)


class LatentCache(KVCache):
    """The cache of latent attention: per layer one (B, S_max, R + Dr) buffer, a row per token holding its
    normalised latent then its rotated rope key (DeepSeek's 576-wide row). The bookkeeping (real slots,
    positions, length, keep_rows, reset) is KVCache's; the rows take the keys' place and there are no
    separate values (in the absorbed form they are the latents)."""

    def _allocate(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, max_len, config.kv_lora_rank + config.qk_rope_head_dim)  # (B, S_max, R + Dr)
        return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)], []

    def write(self, layer: int, kv):
        """Store the new tokens' rows kv (B, T, R + Dr) of `layer` after the past ones; return all (B, S, R + Dr)."""
        slots = self._new_slots(kv.shape[1])
        self._k[layer][:, slots] = kv
        return self._k[layer][:, :slots.stop]
