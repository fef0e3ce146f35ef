"""Hugging Face folders, our own checkpoint format: config.json, model.safetensors (or shards + index),
generation_config.json and the tokenizer files, exactly what transformers writes and reads. Our module
names are Hugging Face's, so the weights need no key mapping; config.json is translated here.
"""

import dataclasses
import json
from pathlib import Path

import torch

from minillama.checkpoint.atomic import atomic_folder
from minillama.checkpoint.names import from_hf_name, to_hf_name
from minillama.config import FAMILIES, ROPE_TYPES, ModelConfig, RopeScaling, UserError

# ---- config.json <-> ModelConfig ----

def config_to_hf(config: ModelConfig) -> dict:
    """The config.json transformers reads for this model."""
    from minillama.model.rope import rope_base

    d = {
        "architectures": [FAMILIES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": rope_base(config),  # HF has no static NTK type: it is just this larger base
        "rope_scaling": rope_scaling_to_hf(config),
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": _json_ids(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    s = config.rope_scaling
    if s is not None and s.type == "dynamic":  # HF's dynamic NTK scales from max_position_embeddings on
        d["max_position_embeddings"] = s.original(config)
    if config.position_encoding != "rope":  # ours alone: transformers' Llama knows no ALiBi
        d["position_encoding"] = config.position_encoding
    if config.model_type == "llama":
        if config.qkv_bias:
            raise UserError("a llama config.json cannot express a q/k/v-only bias; use model_type qwen2")
        d |= {"attention_bias": False, "mlp_bias": False}
    elif config.model_type == "qwen2":
        if not config.qkv_bias:
            raise UserError("Qwen2 always has q/k/v biases; set qkv_bias=True or use model_type llama")
        d |= {"use_sliding_window": config.sliding_window is not None,
              "sliding_window": config.sliding_window, "max_window_layers": 0}
    elif config.model_type in ("mistral", "mixtral"):
        d["sliding_window"] = config.sliding_window
    d |= _experts_to_hf(config) | _latent_to_hf(config)
    back = config_from_hf(d)  # what transformers will build from this file: it must be this model
    lost = [f"{name}={getattr(config, name)!r}" for name in _SPARSE_FIELDS
            if getattr(back, name) != getattr(config, name)]
    if lost:
        raise UserError(f"a {config.model_type} config.json cannot express {', '.join(lost)}; "
                        f"choose the model_type of a family that has them ({', '.join(FAMILIES)})")
    return d


# the fields only some families can express; config_to_hf checks that they survive the trip
_SPARSE_FIELDS = ("n_experts", "experts_per_token", "moe_dim", "norm_topk_prob", "routed_scale", "shared_expert_dim",
                  "shared_expert_gate", "first_dense_layers", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                  "qk_nope_head_dim", "v_head_dim", "qkv_bias")


def _experts_to_hf(c: ModelConfig) -> dict:
    """Mixture-of-experts keys of config.json, per family."""
    losses = {"router_aux_loss_coef": c.router_aux_loss_coef, "router_z_loss_coef": c.router_z_loss_coef}
    if c.model_type == "mixtral":
        return losses | {"num_local_experts": c.n_experts, "num_experts_per_tok": c.experts_per_token,
                         "router_jitter_noise": 0.0}  # the experts are intermediate_size = ffn_dim wide
    if c.model_type == "qwen2_moe":
        return losses | {
            "num_experts": c.n_experts, "num_experts_per_tok": c.experts_per_token, "moe_intermediate_size": c.moe_dim,
            "shared_expert_intermediate_size": c.shared_expert_dim or 0, "norm_topk_prob": c.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": c.qkv_bias, "use_sliding_window": False}
    if c.model_type == "deepseek_v2":  # all layers dense: the first n_layers are (first_k_dense_replace)
        return losses | {
            "n_routed_experts": c.n_experts, "num_experts_per_tok": c.experts_per_token,
            "moe_intermediate_size": c.moe_dim, "n_shared_experts": (c.shared_expert_dim or 0) // c.moe_dim,
            "first_k_dense_replace": c.first_dense_layers if c.n_experts else c.n_layers,
            "routed_scaling_factor": c.routed_scale, "topk_method": "greedy", "norm_topk_prob": c.norm_topk_prob}
    return {}


def _latent_to_hf(c: ModelConfig) -> dict:
    if c.model_type != "deepseek_v2":
        return {}
    return {"kv_lora_rank": c.kv_lora_rank, "q_lora_rank": c.q_lora_rank, "qk_rope_head_dim": c.qk_rope_head_dim,
            "qk_nope_head_dim": c.qk_nope_head_dim, "v_head_dim": c.v_head_dim, "head_dim": c.qk_rope_head_dim,
            "attention_bias": False, "mlp_bias": False}


def classifier_fields(config: ModelConfig, labels: list[str]) -> dict:
    """What a sequence classifier adds to config.json: its class, and the label names by index."""
    family = FAMILIES[config.model_type].removesuffix("ForCausalLM")
    return {"architectures": [f"{family}ForSequenceClassification"], "num_labels": len(labels),
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}


def _json_ids(ids):
    return list(ids) if isinstance(ids, tuple) else ids


def rope_scaling_to_hf(config: ModelConfig) -> dict | None:
    """`rope_scaling` as transformers reads it (4.x and 5.x), our field names where they differ. Types
    transformers lacks (truncation, rerope, leaky_rerope) are written the same way, so it refuses them."""
    s = config.rope_scaling
    if s is None or s.type == "ntk":
        return None
    d = {"rope_type": s.type, "factor": s.factor}
    if s.type in ("yarn", "llama3", "longrope"):
        d["original_max_position_embeddings"] = s.original(config)
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if f.name not in ("type", "factor", "original_max_seq_len") and value is not None:
            d[f.name] = list(value) if isinstance(value, tuple) else value
    return d


def rope_scaling_from_hf(d: dict, source: str) -> tuple[RopeScaling | None, int]:
    """(our RopeScaling, max_seq_len) from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    max_len = d.get("max_position_embeddings", 2048)
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    for key in ("type", "rope_theta"):
        params.pop(key, None)
    if (params.pop("partial_rotary_factor", None) or 1.0) != 1.0:
        raise UserError(f"{source}: partial_rotary_factor (rotating part of each head) is not supported")
    if kind == "default":
        return None, max_len
    if kind not in ROPE_TYPES:
        raise UserError(f"{source}: rope type {kind!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
    original = params.pop("original_max_position_embeddings", None)
    if params.get("factor") is None:  # yarn and longrope may leave it to the two lengths
        params["factor"] = max_len / original if original else 1.0
    try:
        scaling = RopeScaling.of({"type": kind, "original_max_seq_len": original} | params)
    except (UserError, TypeError) as e:
        raise UserError(f"{source}: rope_scaling: {e}") from None
    if kind == "dynamic":  # max_position_embeddings is the trained length; we may run factor times longer
        return dataclasses.replace(scaling, original_max_seq_len=max_len), int(max_len * scaling.factor)
    return scaling, max_len


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    model_type = d.get("model_type", "llama")
    if model_type not in FAMILIES:
        raise UserError(f"{source}: model_type {model_type!r} is not supported; use one of {', '.join(FAMILIES)}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise UserError(f"{source}: missing field {key!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Llama uses silu)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise UserError(f"{source}: attention_bias/mlp_bias on a llama model is not supported")
    n_heads = d["num_attention_heads"]
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d["hidden_size"] and model_type != "deepseek_v2":
        raise UserError(f"{source}: head_dim {head_dim} x {n_heads} heads != hidden_size {d['hidden_size']}")
    rope = d.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling, max_len = rope_scaling_from_hf(d, source)
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen2_moe") and not d.get("use_sliding_window", False):
        window = None
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=n_heads if model_type == "deepseek_v2" else d.get("num_key_value_heads") or n_heads,
            hidden_dim=d.get("intermediate_size"),
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            position_encoding=d.get("position_encoding", "rope"), max_seq_len=max_len,
            tie_embeddings=d.get("tie_word_embeddings", model_type == "qwen2"),
            qkv_bias=model_type == "qwen2" or model_type == "qwen2_moe" and d.get("qkv_bias", True),
            sliding_window=window, model_type=model_type,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"), **_experts_from_hf(d, model_type, source), **_latent_from_hf(d))
    except UserError as e:  # e.g. heads that do not divide: name the file
        raise e.naming(source) from None


def _experts_from_hf(d: dict, model_type: str, source: str) -> dict:
    """ModelConfig's mixture-of-experts fields from a config.json of a MoE family."""
    losses = {"router_aux_loss_coef": d.get("router_aux_loss_coef", d.get("aux_loss_alpha", 0.001)),
              "router_z_loss_coef": d.get("router_z_loss_coef", 0.0)}
    if model_type == "mixtral":
        return losses | {"n_experts": d.get("num_local_experts", 8),
                         "experts_per_token": d.get("num_experts_per_tok", 2)}
    if model_type == "qwen2_moe" and d.get("num_experts", 60):
        if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
            raise UserError(f"{source}: Qwen2-MoE with dense layers among the sparse ones (decoder_sparse_step, "
                            "mlp_only_layers) is not supported")
        return losses | {"n_experts": d.get("num_experts", 60), "experts_per_token": d.get("num_experts_per_tok", 4),
                         "expert_dim": d.get("moe_intermediate_size", 1408),
                         "norm_topk_prob": d.get("norm_topk_prob", False),
                         "shared_expert_dim": d.get("shared_expert_intermediate_size") or None,
                         "shared_expert_gate": True}
    first_dense, n_routed = d.get("first_k_dense_replace", 0), d.get("n_routed_experts", 64)
    if model_type != "deepseek_v2" or first_dense >= d["num_hidden_layers"] or not n_routed:
        return {}
    if d.get("topk_method", "greedy") not in ("greedy", None) or d.get("moe_layer_freq", 1) != 1:
        raise UserError(f"{source}: DeepSeek routing other than greedy top-k in every layer (topk_method "
                        f"{d.get('topk_method')!r}, moe_layer_freq) is not supported")
    moe_dim = d.get("moe_intermediate_size", 1407)
    return losses | {"n_experts": n_routed, "experts_per_token": d.get("num_experts_per_tok") or 1,
                     "expert_dim": moe_dim, "norm_topk_prob": False,
                     "routed_scale": float(d.get("routed_scaling_factor", 1.0)),
                     "shared_expert_dim": moe_dim * d.get("n_shared_experts", 2) or None,
                     "first_dense_layers": first_dense}


def _latent_from_hf(d: dict) -> dict:
    if d.get("model_type") != "deepseek_v2":
        return {}
    return {"kv_lora_rank": d.get("kv_lora_rank", 512), "q_lora_rank": d.get("q_lora_rank", 1536),
            "qk_rope_head_dim": d.get("qk_rope_head_dim", 64), "qk_nope_head_dim": d.get("qk_nope_head_dim", 128),
            "v_head_dim": d.get("v_head_dim", 128)}


def read_config(path) -> ModelConfig:
    """A config.json (Hugging Face keys), or a JSON file of ModelConfig's own field names."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a JSON object")
    if "hidden_size" in d:
        return config_from_hf(d, str(path))
    unknown = set(d) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise UserError(f"{path}: unknown config fields {sorted(unknown)}")
    try:
        return ModelConfig(**d)
    except UserError as e:
        raise e.naming(path) from None


# ---- reading the weights ----

def read_folder(folder: Path, convert):
    """(ModelConfig, {name: tensor}) of a Hugging Face folder, each tensor passed through `convert` as read."""
    config = read_config(folder)
    tensors = {from_hf_name(k, config.model_type): v
               for file in _hf_weight_files(folder) for k, v in _read_weight_file(file, convert).items()}
    return config, tensors


def _hf_weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).exists():
            return [folder / single]
        if (folder / index).exists():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{folder / index}: not a valid shard index ({type(e).__name__}: {e})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise UserError(f"{folder / index}: lists shard {absent[0]}, which is not in the folder")
            return files
    raise UserError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_weight_file(file: Path, convert) -> dict:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(file, framework="pt") as f:
                return {name: convert(f.get_tensor(name)) for name in f.keys() if _is_weight(name)}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    return torch_load(file, convert)


def torch_load(file: Path, convert=lambda t: t) -> dict:
    """A pickled state dict, with weights_only=True (no code runs) and mmap (nothing is read twice)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise UserError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: holds a {type(state).__name__}, not a state dict")
    return {name: convert(t) for name, t in state.items() if torch.is_tensor(t) and _is_weight(name)}


def _is_weight(name: str) -> bool:
    return not name.endswith("rotary_emb.inv_freq")  # older HF files store the rotary table; we recompute it


# ---- writing a folder ----

def save_model(model, folder, tokenizer=None, max_shard_size: int = 2 * 1024**3) -> Path:
    """Write a Hugging Face folder that transformers' from_pretrained reads, atomically (atomic_folder)."""
    folder = Path(folder)
    # replacing a folder deletes what was in it: only ever replace a checkpoint
    if folder.is_file() or folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").exists():
        raise UserError(f"{folder}: exists and is not a checkpoint folder; choose a new or empty folder")
    with atomic_folder(folder) as tmp:
        write_model_files(model, tmp, tokenizer, max_shard_size)
    return folder


def write_model_files(model, folder: Path, tokenizer=None, max_shard_size: int = 2 * 1024**3) -> None:
    """The files of a Hugging Face folder, written into `folder` (a temporary one, renamed when complete)."""
    c = model.config
    _write_weights(model, folder, max_shard_size)
    config = config_to_hf(c) | {"torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if hasattr(model, "score"):  # LlamaForSequenceClassification
        config |= classifier_fields(c, model.labels)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {"bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
                                                    "eos_token_id": _json_ids(c.eos_token_id)})
    if tokenizer is not None:
        tokenizer.save(folder)


def _write_weights(model, folder: Path, max_shard_size: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger."""
    from safetensors.torch import save_file
    family = model.config.model_type
    state = {to_hf_name(name, family): t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:  # (a classifier has no lm_head)
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; HF leaves it out too
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata=meta)
        weight_map |= {name: file for name in shard}
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, d: dict) -> None:  # inside a folder that is renamed into place when complete
    path.write_text(json.dumps(d, indent=2) + "\n")
