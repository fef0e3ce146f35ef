"""Hugging Face folders, our own checkpoint format: config.json, model.safetensors (or shards + index),
generation_config.json and the tokenizer files, exactly what transformers writes and reads. Our module
names are Hugging Face's, so the weights need no key mapping; config.json is translated here.
"""

import dataclasses
import json
from pathlib import Path

import torch

from minillama.checkpoint.atomic import atomic_folder
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
    elif config.model_type == "mistral":
        d["sliding_window"] = config.sliding_window
    return d


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
    if head_dim is not None and head_dim * n_heads != d["hidden_size"]:
        raise UserError(f"{source}: head_dim {head_dim} x {n_heads} heads != hidden_size {d['hidden_size']}")
    rope = d.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling, max_len = rope_scaling_from_hf(d, source)
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads, hidden_dim=d.get("intermediate_size"),
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            position_encoding=d.get("position_encoding", "rope"), max_seq_len=max_len,
            tie_embeddings=d.get("tie_word_embeddings", model_type == "qwen2"),
            qkv_bias=model_type == "qwen2", sliding_window=window, model_type=model_type,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"))
    except UserError as e:  # e.g. heads that do not divide: name the file
        raise e.naming(source) from None


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
    tensors = {k: v for file in _hf_weight_files(folder) for k, v in _read_weight_file(file, convert).items()}
    return read_config(folder), tensors


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
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {"bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
                                                    "eos_token_id": _json_ids(c.eos_token_id)})
    if tokenizer is not None:
        tokenizer.save(folder)


def _write_weights(model, folder: Path, max_shard_size: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger."""
    from safetensors.torch import save_file
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as the embedding; HF leaves it out too
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
