"""Meta's original Llama 2 release: params.json + consolidated.NN.pth (one or more model-parallel shards)."""

import json
from pathlib import Path

import torch

from minillama.checkpoint.hf import torch_load
from minillama.checkpoint.names import META, interleaved_to_half, our_name
from minillama.config import ModelConfig, UserError

# Meta split each matrix across model-parallel shards along one axis (as convert_llama_weights_to_hf.py
# concatenates them): column-parallel layers by output rows, row-parallel ones by input columns.
META_SHARD_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                   "tok_embeddings": 1}


def read_meta(folder: Path, convert):
    """(ModelConfig, {our name: tensor}) of a Meta folder, q/k rows reordered to rotate-half."""
    state = meta_tensors(folder)
    config = meta_config(folder, state)
    tensors = {}
    for name, t in state.items():
        if name == "rope.freqs":  # the standard frequencies, recomputed by the model
            continue
        ours = our_name(name, META)
        if ours is None:
            raise UserError(f"{folder}: unknown tensor {name} in a Meta checkpoint")
        if ours.endswith("q_proj.weight"):
            t = interleaved_to_half(t, config.n_heads)
        elif ours.endswith("k_proj.weight"):
            t = interleaved_to_half(t, config.n_kv_heads)
        tensors[ours] = convert(t)
    return config, tensors


def meta_tensors(folder: Path) -> dict:
    """The consolidated.NN.pth shards joined into one state dict (a single shard is used as it is)."""
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{folder}: params.json but no consolidated.*.pth weight files")
    states = [torch_load(file) for file in shards]
    if len(states) == 1:
        return states[0]
    joined = {}
    for name, first in states[0].items():
        if first.ndim == 1:  # norms are replicated on every shard
            joined[name] = first
            continue
        key = name.split(".")[-2]  # layers.0.attention.wq.weight -> wq
        if key not in META_SHARD_AXIS or any(name not in s for s in states):
            raise UserError(f"{folder}: cannot join tensor {name} across {len(states)} shards")
        joined[name] = torch.cat([s[name] for s in states], dim=META_SHARD_AXIS[key])
    return joined


def meta_config(folder: Path, state: dict) -> ModelConfig:
    file = folder / "params.json"
    try:
        params = json.loads(file.read_text())
        n_heads = params["n_heads"]
        config = ModelConfig(
            # Llama 2's params.json says vocab_size -1 and leaves the FFN width to a rounding rule:
            # the tensors' shapes are the truth for both
            vocab_size=state["tok_embeddings.weight"].shape[0], dim=params["dim"],
            n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
            hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
            norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=params.get("max_seq_len", 4096), bos_token_id=1, eos_token_id=2)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise UserError(f"{file}: missing field or tensor {e}") from None
    except UserError as e:
        raise e.naming(file) from None
    return config
