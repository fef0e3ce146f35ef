"""Tensor names: ours (= Hugging Face's), Meta's and llama.cpp's (GGUF), mapped in this one place, and the
q/k row order that Meta and llama.cpp use for rotary pairs. Two Hugging Face families name their experts
differently from the rest; their folders are mapped here too."""

import torch

# suffix under model.layers.N.     Meta name under layers.N.     GGUF name under blk.N.
LAYER_NAMES = {
    "self_attn.q_proj.weight": ("attention.wq.weight", "attn_q.weight"),
    "self_attn.k_proj.weight": ("attention.wk.weight", "attn_k.weight"),
    "self_attn.v_proj.weight": ("attention.wv.weight", "attn_v.weight"),
    "self_attn.o_proj.weight": ("attention.wo.weight", "attn_output.weight"),
    "self_attn.q_proj.bias": (None, "attn_q.bias"),  # Qwen2 only
    "self_attn.k_proj.bias": (None, "attn_k.bias"),
    "self_attn.v_proj.bias": (None, "attn_v.bias"),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", "ffn_gate.weight"),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", "ffn_up.weight"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", "ffn_down.weight"),
    "input_layernorm.weight": ("attention_norm.weight", "attn_norm.weight"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "ffn_norm.weight"),
}
TOP_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", "token_embd.weight"),
    "model.norm.weight": ("norm.weight", "output_norm.weight"),
    "lm_head.weight": ("output.weight", "output.weight"),
}
META, GGUF = 0, 1
LAYER_PREFIX = ("layers.", "blk.")
# foreign name -> ours, per format
_TO_OURS = [({v[f]: k for k, v in LAYER_NAMES.items() if v[f]}, {v[f]: k for k, v in TOP_NAMES.items()})
            for f in (META, GGUF)]


def our_name(name: str, fmt: int) -> str | None:
    """'blk.3.attn_q.weight' (GGUF) or 'layers.3.attention.wq.weight' (Meta) -> 'model.layers.3.self_attn...';
    None for a name we do not know."""
    layer_names, top_names = _TO_OURS[fmt]
    prefix = LAYER_PREFIX[fmt]
    if name.startswith(prefix):
        index, rest = name[len(prefix):].split(".", 1)
        return f"model.layers.{index}.{layer_names[rest]}" if rest in layer_names else None
    return top_names.get(name)


def foreign_name(name: str, fmt: int) -> str | None:
    """Ours -> the format's: 'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (GGUF);
    None for a name the format has no place for."""
    if name.startswith("model.layers."):
        index, rest = name[len("model.layers."):].split(".", 1)
        foreign = LAYER_NAMES.get(rest, (None, None))[fmt]
        return f"{LAYER_PREFIX[fmt]}{index}.{foreign}" if foreign else None
    return TOP_NAMES.get(name, (None, None))[fmt]


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection from interleaved rotary pairs (x[2i], x[2i+1]), which
    Meta's complex-number RoPE uses and llama.cpp's convert_hf_to_gguf.py `permute` restores for the llama
    arch, to HF's rotate-half pairs (x[i], x[i + D/2]). The same as `permute` in transformers'
    convert_llama_weights_to_hf.py and the inverse of llama.cpp's. w (heads·D, ...) -> same shape."""
    D = w.shape[0] // n_heads
    pairs = torch.arange(w.shape[0]).reshape(n_heads, D // 2, 2)  # (heads, D/2, 2): row 2i+j of a head at [i, j]
    return _rows(w, pairs.transpose(1, 2).reshape(-1))  # (heads, 2, D/2): j-th half first, then i


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_half: HF's rotate-half rows -> the interleaved pairs llama.cpp's llama
    arch expects (what convert_hf_to_gguf.py's `permute` does when it writes a GGUF). w (heads·D, ...)."""
    D = w.shape[0] // n_heads
    halves = torch.arange(w.shape[0]).reshape(n_heads, 2, D // 2)  # (heads, 2, D/2): row j·D/2 + i at [j, i]
    return _rows(w, halves.transpose(1, 2).reshape(-1))  # (heads, D/2, 2): pair i, then its two halves


def _rows(w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """w[order] along dim 0, rows copied whole as bytes by numpy (torch indexes 1-byte GGUF blocks ~1000x
    slower, an element at a time)."""
    rows = w.contiguous().reshape(w.shape[0], -1).view(torch.uint8).numpy()  # (rows, bytes per row)
    return torch.from_numpy(rows[order.numpy()]).view(w.dtype).reshape(w.shape)


# Our experts are named as Qwen2-MoE's (mlp.gate, mlp.experts.N.gate_proj, mlp.shared_expert). Mixtral's files
# call the block block_sparse_moe and the projections w1 (gate), w3 (up), w2 (down); DeepSeek's call the
# shared expert shared_experts. transformers renames them on load as well (its conversion_mapping.py).
HF_RENAMES = {
    "mixtral": [(".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                (".w2.", ".down_proj.")],
    "deepseek_v2": [(".mlp.shared_experts.", ".mlp.shared_expert.")],
}


def from_hf_name(name: str, model_type: str) -> str:
    """A tensor name in a Hugging Face folder of this family -> ours."""
    for theirs, ours in HF_RENAMES.get(model_type, []):
        name = name.replace(theirs, ours)
    return name


def to_hf_name(name: str, model_type: str) -> str:
    """Our tensor name -> the one a Hugging Face folder of this family uses."""
    for theirs, ours in reversed(HF_RENAMES.get(model_type, [])):
        name = name.replace(ours, theirs)
    return name
