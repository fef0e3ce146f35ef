"""The Llama-family decoder, from scratch: pure math, no loading, no sampling, no device policy.

Shapes use one alphabet: B batch, T new tokens, S keys (past + new), C model width (dim), H query heads,
K key/value heads, G = H // K query heads per kv head, D head dim, F SwiGLU width, V vocabulary.

Module names mirror Hugging Face's LlamaForCausalLM (model.embed_tokens, model.layers[i].self_attn.q_proj,
mlp.gate_proj, input_layernorm, model.norm, lm_head), so a checkpoint's keys load without a mapping.
A mixture of experts (moe.py) or DeepSeek's latent attention (mla.py) takes the place of a layer's MLP or
attention when the config asks for one.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minillama.config import ModelConfig, UserError
from minillama.model.cache import KVCache, SinkCache
from minillama.model.positions import Positions
from minillama.model.rope import apply_rope, fixed_rotation, rope_tables


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight (Zhang & Sennrich 2019): LayerNorm without the mean and bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32: the mean of squares under/overflows in half precision
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        C, D = config.dim, config.head_dim
        self.q_proj = nn.Linear(C, self.n_heads * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * D, C, bias=False)
        self.use_sdpa = True  # False selects reference_attention; a test shows they agree

    def forward(self, x, rope, mask, cache=None, layer=0):
        """x (B, T, C); rope: (cos, sin) (B, 1, T, D) of the new tokens, or a Positions that places queries
        and keys at attention time; mask (B, 1, T, S) bool, True = may attend, or None = causal."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        attend = scaled_dot_product_attention if self.use_sdpa else reference_attention
        if isinstance(rope, Positions):  # the cache holds keys as projected (model/positions.py)
            if cache is not None:
                k, v = cache.write(layer, k, v)
            y = rope.attend(q, k, v, mask, attend)
        else:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if hasattr(cache, "attend"):  # a paged cache stores k, v in its blocks and attends row by row
                y = cache.attend(layer, q, k, v, mask, attend)  # (B, H, T, D)
            else:
                if cache is not None:
                    k, v = cache.write(layer, k, v)  # (B, K, S, D): the past and the new
                y = attend(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H·D)
        return self.o_proj(y)


def reference_attention(q, k, v, mask, scale=None):
    """softmax(q·kᵀ · scale + mask) · v written out, scale = 1/sqrt(D) unless given (Vaswani et al. 2017,
    arXiv:1706.03762, eq. 1), the plain reference the fused kernel is tested against.

    q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv). Query heads are grouped onto their kv head with a view,
    (B, K, G, T, D) against (B, K, 1, S, D), so GQA/MQA share keys and values without copying them.
    mask: (B, 1, T, S) bool, or (B, H, T, S) float added to the scores (ALiBi), as SDPA takes them.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    q = q.view(B, K, H // K, T, D)  # (B, K, G, T, D)
    scores = q @ k.unsqueeze(2).transpose(-1, -2) * (scale or 1 / math.sqrt(D))  # (B, K, G, T, S)
    if mask is None:  # plain causal
        mask = attention_mask_of(torch.ones(1, S, dtype=torch.bool, device=q.device), T)  # (1, 1, T, S)
    if mask.dtype.is_floating_point:
        scores = scores.float() + mask.view(B, K, H // K, T, S)
    else:
        scores = scores.float().masked_fill(~mask.unsqueeze(1), float("-inf"))  # mask (B, 1, 1, T, S)
    weights = scores.softmax(dim=-1).to(q.dtype)
    y = weights @ v.unsqueeze(2)  # (B, K, G, T, Dv)
    return y.view(B, H, T, -1)


def scaled_dot_product_attention(q, k, v, mask, scale=None):
    """The same computation by PyTorch's fused kernel; enable_gqa shares kv heads without copying."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=scale)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv:2002.05202): down(silu(gate(x)) · up(x)), F = hidden_dim or ffn_dim wide."""

    def __init__(self, config: ModelConfig, hidden_dim: int | None = None):
        super().__init__()
        hidden = hidden_dim or config.ffn_dim
        self.gate_proj = nn.Linear(config.dim, hidden, bias=False)
        self.up_proj = nn.Linear(config.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: normalise the input of each sublayer, never the residual stream itself."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        # imported here: moe.py and mla.py build on this module's MLP, RMSNorm and attention functions
        from minillama.model.mla import LatentAttention
        from minillama.model.moe import MoE

        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config) if config.kv_lora_rank is None else LatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.sparse = config.is_moe_layer(layer)
        self.mlp = MoE(config) if self.sparse else MLP(config)

    def forward(self, x, rope, mask, cache=None, layer=0, router_logits=None):
        """rope: (cos, sin) (B, 1, T, D) or a Positions (llama.Attention); router_logits: a list the MoE
        layers append their router's logits to (training's load-balancing loss), or None."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, router_logits) if self.sparse else self.mlp(h))


class LlamaModel(nn.Module):
    """Embedding, the decoder stack and the final norm: token ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.fixed_rotation = fixed_rotation(config)  # False: keys placed at attention time (positions.py)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)compute the rotary tables; called again after loading weights onto a meta-built model."""
        cos, sin = rope_tables(self.config, self.config.max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, attention_mask=None, cache=None, router_logits=None):
        """input_ids (B, T); attention_mask (B, T) 1 = real token, 0 = (left) padding, for the new tokens
        only: a cache remembers the past ones; None = no padding (and the fastest path); or, without a
        cache, (B, 1, T, T) bool, who may attend to whom (packed examples: block-diagonal causal). Returns
        hidden states (B, T, C). router_logits: a list each MoE layer appends its router's logits (B·T, E) to."""
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.dim() == 4:
            if cache is not None:
                raise ValueError("a (B, 1, T, T) attention mask is for whole sequences, without a KV cache")
            mask = attention_mask.bool()  # (B, 1, T, T)
            # a token's rotary position = the keys it sees - 1: each packed example starts at position 0
            if not self.fixed_rotation:
                raise ValueError("packed examples need a fixed rotation (RoPE, static scaling), not "
                                 f"{self.config.rope_scaling or self.config.position_encoding}")
            positions = mask[:, 0].sum(-1) - 1  # (B, T)
            rope = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, D) each
            return self._layers(input_ids, mask, rope, None, router_logits)
        new = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
            else attention_mask.bool()  # (B, T)
        past = cache.past_mask() if cache is not None else new[:, :0]  # (B, P)
        window = self.config.sliding_window
        # no padding, no past, no window in reach: the fused kernel's own causal mask is fastest. Only
        # shapes decide, never the mask's values, so torch.compile sees no data-dependent branch
        plain = attention_mask is None and past.shape[1] == 0 and (window is None or T <= window)
        if self.fixed_rotation and not (cache is not None and cache.moves_positions):
            start = cache.next_positions if cache is not None else torch.zeros(B, dtype=torch.long, device=new.device)
            positions = rotary_positions(new, start)  # (B, T)
            rope = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, D) each
        else:  # ALiBi, ReRoPE, frequencies that depend on the length, a cache that moves positions
            rope, plain = Positions(self.config, torch.cat([past, new], dim=1), T), False
        mask = None if plain else attention_mask_of(torch.cat([past, new], dim=1), T, window)  # (B, 1, T, S)
        x = self._layers(input_ids, mask, rope, cache, router_logits)
        if cache is not None:
            cache.advance(new)
        return x

    def _layers(self, input_ids, mask, rope, cache, router_logits):
        """The embedding, every decoder layer and the final norm, given the mask and the rotation."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i, router_logits)
        return self.norm(x)


def rotary_positions(new, start):
    """Rotary position of each new token (B, T), counting real tokens only, so a left-padded prompt starts
    at 0 like the same prompt alone. new (B, T) bool real tokens; start (B,) each row's next position."""
    return (start[:, None] + new.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_of(keys, T: int, window: int | None = None):
    """Who may attend to whom, built by broadcasting: (B, 1, T, S) bool, True = may attend.

    keys (B, S) bool: which of the S key slots (past + the T new, the new last) hold real tokens. Causal,
    real keys only, and within `window` slots (Mistral's sliding window); but always itself, so a padding
    row never has nothing to attend (its output is garbage no real token reads, but it must not be NaN).
    """
    S = keys.shape[1]
    q_slot = torch.arange(S - T, S, device=keys.device)[:, None]  # (T, 1) slot of each new token
    k_slot = torch.arange(S, device=keys.device)[None, :]  # (1, S)
    mask = (k_slot <= q_slot) & (keys[:, None, :] | (k_slot == q_slot))  # (B, T, S)
    if window is not None:
        mask = mask & (q_slot - k_slot < window)
    return mask.unsqueeze(1)  # (B, 1, T, S)


class Llama(nn.Module):
    """LlamaForCausalLM: the decoder plus the LM head. forward(...) -> logits (B, T, V), always."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, cache=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, cache))

    # ---- the surface the generator, the evaluator, losses and transforms use ----

    def hidden_states(self, input_ids, attention_mask=None, cache=None, router_logits: list | None = None):
        """input_ids (B, T) -> the final norm's output (B, T, C); see LlamaModel.forward. Given a list as
        router_logits, each MoE layer appends its router's logits (B·T, E) to it, for the balance loss."""
        return self.model(input_ids, attention_mask, cache, router_logits)

    def logits(self, hidden):
        """hidden (..., C) -> logits (..., V): apply the LM head only where logits are needed."""
        return self.lm_head(hidden)

    @property
    def layers(self):
        """The decoder blocks, for transforms that wrap or compile each one."""
        return self.model.layers

    @property
    def head_weight(self):
        """The LM head's (V, C) matrix, for a loss that fuses it with the cross-entropy."""
        return self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def new_cache(self, batch_size: int, max_len: int, window: int | None = None, sink_tokens: int = 0):
        """An empty KV cache for this model, on its device, in the dtype of its activations (the norms'): a
        KVCache of max_len slots (latent attention: its own layout, mla.LatentCache, behind the same API),
        or with `window`, a SinkCache of sink_tokens + window slots whatever max_len."""
        from minillama.model.mla import LatentCache

        norm = self.model.norm.weight  # (matmul weights may be bf16 or quantized; the norms never are)
        if window is None:
            kind = KVCache if self.config.kv_lora_rank is None else LatentCache
            return kind(self.config, batch_size, max_len, norm.device, norm.dtype)
        if self.config.kv_lora_rank is not None:
            raise UserError("--window (a SinkCache) is not supported with latent attention (kv_lora_rank): "
                            "its cache keeps rotated latent rows")
        if sink_tokens + window >= self.config.max_seq_len:  # the new token comes after them
            raise UserError(f"sink tokens ({sink_tokens}) + window ({window}) leave no room in the model's context "
                            f"of {self.config.max_seq_len} tokens: use a window below "
                            f"{self.config.max_seq_len - sink_tokens}")
        return SinkCache(self.config, batch_size, sink_tokens, window, norm.device, norm.dtype)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """normal(0, 0.02) everywhere; the two projections that write into the residual stream (o_proj,
        down_proj) get 0.02/sqrt(2·n_layers), so the stream's variance stays put as layers add up (GPT-2)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        return self


class LlamaForSequenceClassification(nn.Module):
    """The decoder plus a `score` head on the last real token (found from the attention mask, which
    works for left and right padding alike, unlike searching for a pad_token_id). `labels` names the
    classes (Hugging Face's id2label); by default LABEL_0, LABEL_1, ... `model`: a pretrained decoder to
    put the head on (a Llama's .model), instead of a new one."""

    def __init__(self, config: ModelConfig, num_labels: int, labels: list[str] | None = None,
                 model: LlamaModel | None = None):
        super().__init__()
        self.config = config
        self.labels = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(num_labels)]
        if len(self.labels) != num_labels:
            raise ValueError(f"{len(self.labels)} label names for {num_labels} labels")
        self.model = LlamaModel(config) if model is None else model
        self.score = nn.Linear(config.dim, num_labels, bias=False)

    @property
    def layers(self):
        """The decoder blocks, for transforms that wrap or compile each one."""
        return self.model.layers

    def forward(self, input_ids, attention_mask=None):
        """-> logits (B, num_labels)"""
        h = self.model(input_ids, attention_mask)  # (B, T, C)
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=input_ids.device)
        else:
            # index of the last 1 in each row: argmax of (slot index where real, -1 elsewhere)
            slots = torch.arange(T, device=input_ids.device)
            last = torch.where(attention_mask.bool(), slots, -1).argmax(-1)  # (B,)
        return self.score(h[torch.arange(B, device=h.device), last])  # (B, num_labels)
