"""Parameter, memory and FLOP arithmetic for a ModelConfig, without allocating a single weight.

`minillama params llama2-7b` prints the parameter breakdown, inference and training memory,
and training FLOPs per token (which the trainer divides into the machine's peak for MFU).
"""

import json
import math
from pathlib import Path

from minillama.config import PRESETS, ModelConfig, UserError, preset

# bytes per element; q4 is GGUF Q4_0: blocks of 32 4-bit weights + one fp16 scale = 18 bytes / 32 = 4.5 bits
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "q4": 4.5 / 8}
ACT_DTYPES = ("fp32", "bf16", "fp16")  # what --dtype may choose for the KV cache and activations


def count_params(config: ModelConfig) -> dict:
    """Parameters per group (embedding, attention, mlp, norms, head, total); a tied head adds 0. A mixture
    of experts adds `active`: the parameters one token goes through (k of the E experts)."""
    C, L, V = config.dim, config.n_layers, config.vocab_size
    sparse = sum(config.is_moe_layer(i) for i in range(L))
    counts = {
        "embedding": V * C,
        "attention": L * attention_params(config),
        "mlp": (L - sparse) * 3 * C * config.ffn_dim + sparse * moe_params(config, config.n_experts),
        "norms": (2 * L + 1) * C,  # input_layernorm + post_attention_layernorm per layer, then model.norm
        "head": 0 if config.tie_embeddings else V * C,
    }
    counts["total"] = sum(counts.values())
    if config.n_experts:
        idle = moe_params(config, config.n_experts) - moe_params(config, config.experts_per_token)
        counts["active"] = counts["total"] - sparse * idle
    return counts


def attention_params(config: ModelConfig) -> int:
    """One layer's attention: q, k, v, o projections; or latent attention's down/up projections and norms."""
    C, H = config.dim, config.n_heads
    if config.kv_lora_rank is None:
        q_out, kv_out = H * config.head_dim, config.n_kv_heads * config.head_dim  # H·D, K·D
        bias = q_out + 2 * kv_out if config.qkv_bias else 0  # Qwen2: a bias on q, k and v, none on o
        return C * q_out + 2 * C * kv_out + q_out * C + bias
    R, Rq, Dn, Dr, Dv = (config.kv_lora_rank, config.q_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
                         config.v_head_dim)
    q = C * H * (Dn + Dr) if Rq is None else C * Rq + Rq + Rq * H * (Dn + Dr)  # q_proj, or q_a + norm + q_b
    kv = C * (R + Dr) + R + R * H * (Dn + Dv)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
    return q + kv + H * Dv * C  # + o_proj


def moe_params(config: ModelConfig, experts: int) -> int:
    """A mixture-of-experts block with `experts` experts: router, the experts, the shared expert and its gate."""
    C, S = config.dim, config.shared_expert_dim or 0
    return C * config.n_experts + experts * 3 * C * config.moe_dim + 3 * C * S + (C if config.shared_expert_gate else 0)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: str = "bf16") -> float:
    """One token's keys and values in every layer: 2 · n_layers · n_kv_heads · head_dim · bytes; latent
    attention keeps the latent and the rope key instead: n_layers · (kv_lora_rank + qk_rope_head_dim) · bytes."""
    if config.kv_lora_rank is not None:
        return config.n_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * BYTES[dtype]
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * BYTES[dtype]


def activation_bytes(config: ModelConfig, batch_size: int, seq_len: int, dtype: str = "bf16") -> int:
    """Tensors autograd keeps for the backward pass of one training step, in bytes.

    Per layer and token, in elements of `dtype` (eager attention; Korthikanti et al. 2022, arXiv:2205.05198,
    adapted to RMSNorm, RoPE, GQA and SwiGLU):
      attention  x (norm input) + x_norm (q/k/v input) + q_rot + o_proj input  = 4·C
                 k_rot + v                                                     = 2·K·D
                 softmax probabilities, per query token                        = H·T'   (T' = min(T, window))
      mlp        h (norm input) + h_norm (gate/up input)                       = 2·C
                 gate (silu input), silu(gate), up, down_proj input            = 4·F
    Whole model: L · B·T · (6·C + 2·K·D + 4·F + H·T') · bytes, plus the final norm input B·T·C · bytes,
    plus logits B·T·V in fp32 (the loss upcasts). A fused attention kernel (flash / SDPA) does not keep
    the H·T' probabilities, so this is an upper bound for it. Norm statistics (B·T per norm) are left out.
    """
    B, T, C, V = batch_size, seq_len, config.dim, config.vocab_size
    H, K, D, L = config.n_heads, config.n_kv_heads, config.head_dim, config.n_layers
    # a token of a mixture of experts keeps k experts' (and the shared expert's) activations, approximately
    F = config.ffn_dim if not config.n_experts else \
        config.experts_per_token * config.moe_dim + (config.shared_expert_dim or 0)
    window = min(T, config.sliding_window or T)
    per_token = L * (6 * C + 2 * K * D + 4 * F + H * window) + C
    return math.ceil(B * T * per_token * BYTES[dtype]) + B * T * V * BYTES["fp32"]


def memory_estimate(config: ModelConfig, batch_size: int, seq_len: int, dtype: str = "bf16") -> dict:
    """Bytes for inference (weights per dtype, KV cache) and for training with AdamW.

    `dtype` is the KV cache's and the activations' element type. Training keeps fp32 master weights,
    fp32 gradients and AdamW's two fp32 moments: 16 bytes a parameter before activations.
    """
    if dtype not in ACT_DTYPES:
        raise UserError(f"dtype {dtype!r}: use one of {', '.join(ACT_DTYPES)}")
    if batch_size <= 0 or seq_len <= 0:
        raise UserError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
    n = count_params(config)["total"]
    # the same model with a key and a value per head, head_dim = dim / n_heads wide (for latent attention
    # the comparison of the DeepSeek-V2 paper, table 1: 2·n_h·d_h·l against (d_c + d_h^R)·l)
    mha = config.replace(n_kv_heads=config.n_heads, kv_lora_rank=None)
    kv_token = kv_cache_bytes_per_token(config, dtype)
    kv_token_mha = kv_cache_bytes_per_token(mha, dtype)
    inference = {
        "weights": {name: math.ceil(n * size) for name, size in BYTES.items()},
        "kv_cache_dtype": dtype,
        "kv_cache_per_token": kv_token,
        "kv_cache_context": kv_token * config.max_seq_len,
        "kv_cache_per_token_mha": kv_token_mha,
        "kv_cache_context_mha": kv_token_mha * config.max_seq_len,
    }
    training = {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "weights": 4 * n,
        "gradients": 4 * n,
        "optimizer": 2 * 4 * n,  # AdamW: first and second moments in fp32
        "activations": activation_bytes(config, batch_size, seq_len, dtype),
    }
    training["total"] = sum(v for k, v in training.items() if k not in ("batch_size", "seq_len"))
    return {"inference": inference, "training": training}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward: 6·N + 12·L·C·T (PaLM, arXiv:2204.02311, appendix B).

    N counts the weights that take part in a matmul: attention, MLP (of a mixture of experts, the k experts
    a token visits) and the output head (which a tied model still multiplies by). The embedding is a
    lookup and norms are elementwise, so they are left out.
    The attention term uses the keys a query sees: min(T, sliding_window).
    """
    p = count_params(config)
    idle = p["total"] - p.get("active", p["total"])  # experts a token does not visit cost it nothing
    n_matmul = p["attention"] + p["mlp"] - idle + config.vocab_size * config.dim
    window = min(seq_len, config.sliding_window or seq_len)
    return 6 * n_matmul + 12 * config.n_layers * config.dim * window


# ---- the `params` command ----

def resolve_config(name_or_path: str) -> ModelConfig:
    """A preset name, a checkpoint folder holding config.json, or a config JSON file."""
    if name_or_path in PRESETS:
        return preset(name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        raise UserError(f"{path}: GGUF files are not read by `params`; pass a preset or a config.json")
    if path.exists():
        from minillama.checkpoint.hf import read_config

        return read_config(path)
    if "/" in name_or_path or path.suffix == ".json":
        raise UserError(f"{path}: no such file or folder")
    return preset(name_or_path)  # raises with the list of valid presets


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _table(title: str, rows: list[tuple[str, str, str]], name_width: int = 0) -> list[str]:
    """A titled block: names left-aligned, values right-aligned, an optional note after."""
    name_w = max(name_width, *(len(r[0]) for r in rows))
    value_w = max(len(r[1]) for r in rows)
    lines = [title]
    for name, value, note in rows:
        lines.append(f"  {name:<{name_w}}  {value:>{value_w}}" + (f"   {note}" if note else ""))
    return lines


def format_report(label: str, config: ModelConfig, params: dict, memory: dict, flops: float) -> str:
    c, inf, tr = config, memory["inference"], memory["training"]
    kv_dtype, ctx = inf["kv_cache_dtype"], c.max_seq_len
    heads = f"{c.n_heads} heads (latent kv {c.kv_lora_rank} + rope {c.qk_rope_head_dim})" if c.kv_lora_rank \
        else f"{c.n_heads} heads ({c.n_kv_heads} kv)"
    ffn = f"{c.n_experts} experts of {c.moe_dim}, {c.experts_per_token} per token" if c.n_experts \
        else f"ffn {c.ffn_dim}"
    head = f"{label}: {c.n_layers} layers, dim {c.dim}, {heads}, {ffn}, vocab {c.vocab_size:,}, context {ctx:,}"
    notes = {"head": "(tied to embedding)" if c.tie_embeddings else "", "active": "per token: k of the experts"}
    param_rows = [(k, f"{v:,}", notes.get(k, "")) for k, v in params.items()]
    saving = inf["kv_cache_context_mha"] / inf["kv_cache_context"]
    kind = "MLA" if c.kv_lora_rank else "MHA" if c.n_kv_heads == c.n_heads else "MQA" if c.n_kv_heads == 1 else "GQA"
    kv_note = "" if kind == "MHA" else \
        f"{kind} saves {saving:.0f}x: MHA would need {human_bytes(inf['kv_cache_context_mha'])}"
    inference_rows = [(f"weights {k}", human_bytes(v), "") for k, v in inf["weights"].items()]
    inference_rows += [
        (f"kv cache / token ({kv_dtype})", human_bytes(inf["kv_cache_per_token"]),
         "" if kind == "MHA" else f"MHA: {human_bytes(inf['kv_cache_per_token_mha'])}"),
        (f"kv cache @ {ctx:,} tokens", human_bytes(inf["kv_cache_context"]), kv_note),
    ]
    training_rows = [
        ("weights (fp32)", human_bytes(tr["weights"]), ""),
        ("gradients (fp32)", human_bytes(tr["gradients"]), ""),
        ("adamw (2 x fp32)", human_bytes(tr["optimizer"]), ""),
        (f"activations ({kv_dtype})", human_bytes(tr["activations"]), "eager attention, logits in fp32"),
        ("total", human_bytes(tr["total"]), ""),
    ]
    flop_rows = [
        ("training (fwd+bwd)", human_count(flops), "6N + 12·L·C·T"),
        ("forward only", human_count(flops / 3), ""),
    ]
    blocks = [
        [head],
        _table("parameters", param_rows, name_width=11),  # 7b's total: 13 digits, 8 spaces after "total"
        _table("inference memory", inference_rows),
        _table(f"training memory (batch {tr['batch_size']}, seq {tr['seq_len']:,}, AdamW)", training_rows),
        _table(f"FLOPs per token (seq {tr['seq_len']:,})", flop_rows),
    ]
    return "\n\n".join("\n".join(b) for b in blocks)


def params_flags(p) -> None:
    p.description = "Parameter count, inference/training memory and training FLOPs per token, from the config alone."
    p.add_argument("model", metavar="PRESET|PATH",
                   help=f"a preset ({', '.join(PRESETS)}), a checkpoint folder or a config JSON file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--batch-size", type=int, default=1, help="training batch size for activations (default 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="training sequence length (default: the model's context length)")
    p.add_argument("--dtype", choices=ACT_DTYPES, default="bf16",
                   help="element type of the KV cache and activations (default bf16)")


def params_command(args) -> None:
    config = resolve_config(args.model)
    seq_len = args.seq_len or config.max_seq_len
    params = count_params(config)
    memory = memory_estimate(config, args.batch_size, seq_len, args.dtype)
    flops = flops_per_token(config, seq_len)
    if args.json:
        print(json.dumps({"model": args.model, "params": params, "memory": memory,
                          "flops_per_token": flops}, indent=2))
    else:
        print(format_report(args.model, config, params, memory, flops))
