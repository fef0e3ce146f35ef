"""Checkpoints: our own Hugging Face-layout folder, and import from Meta and llama.cpp (GGUF) files.

Our checkpoint is what `transformers` writes: config.json, model.safetensors (or shards + index),
generation_config.json, tokenizer files. Our module names are HF's, so it needs no key mapping; the Meta
and GGUF names are mapped in one place, LAYER_NAMES and TOP_NAMES below.

`load_model(path)` reads:
  a HF folder   LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: config.json + safetensors
                (single or sharded) or pytorch_model.bin
  a .gguf file  llama.cpp's format, architectures llama and qwen2, dequantized to float
  a Meta folder params.json + consolidated.NN.pth (Llama 2's original release, one or more shards)
It builds the model on the meta device and assigns the tensors it reads, so the weights exist once.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from minillama.config import ModelConfig, UserError
from minillama.model import Llama

# ---- names: ours (= Hugging Face's) and the Meta / GGUF ones, in one place ----

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


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection from interleaved rotary pairs (x[2i], x[2i+1]), which
    Meta's complex-number RoPE uses and llama.cpp's convert_hf_to_gguf.py `permute` restores for the llama
    arch, to HF's rotate-half pairs (x[i], x[i + D/2]). The same as `permute` in transformers'
    convert_llama_weights_to_hf.py and the inverse of llama.cpp's. w (heads·D, ...) -> same shape."""
    D = w.shape[0] // n_heads
    pairs = w.reshape(n_heads, D // 2, 2, *w.shape[1:])  # (heads, D/2, 2, ...): row 2i+j of a head at [i, j]
    return pairs.transpose(1, 2).reshape(w.shape)  # (heads, 2, D/2, ...): j-th half first, then i


# ---- loading ----

def load_model(path, dtype=torch.float32, device="cpu") -> Llama:
    """A HF folder, a .gguf file or a Meta folder -> Llama in eval mode, weights in `dtype` on `device`."""
    path = Path(path)
    config, tensors = _read_checkpoint(path, lambda t: t.to(device=device, dtype=dtype))
    return _assemble(config, tensors, path, device)


def load_config(path) -> ModelConfig:
    """Only the ModelConfig of a checkpoint (a GGUF's metadata, a Meta folder's params + tensor shapes)."""
    path = Path(path)
    kind = _kind(path)
    if kind == "hf":
        return _hf_config(path)
    if kind == "gguf":
        return _gguf_config(_open_gguf(path), path)
    return _meta_config(path, _meta_tensors(path))


def _read_checkpoint(path: Path, convert):
    kind = _kind(path)
    if kind == "hf":  # every tensor of every weight file, converted one by one as it is read
        tensors = {k: v for file in _hf_weight_files(path) for k, v in _read_weight_file(file, convert).items()}
        return _hf_config(path), tensors
    if kind == "gguf":
        return _read_gguf(path, convert)
    return _read_meta(path, convert)


def _kind(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file or folder")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".pth"):
            raise UserError(f"{path}: give the folder that holds it, not the file")
        raise UserError(f"{path}: not a checkpoint (expected a folder or a .gguf file)")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise UserError(f"{path}: no config.json (Hugging Face folder) or params.json (Meta folder) in this folder")


def _assemble(config: ModelConfig, tensors: dict, source: Path, device) -> Llama:
    """Build the model without memory (meta device) and hand it the tensors: no second copy of the weights."""
    with torch.device("meta"):
        model = Llama(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
        del expected["lm_head.weight"]
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise UserError(f"{source}: missing tensors {', '.join(missing[:4])}{more}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UserError(f"{source}: unexpected tensors {', '.join(unexpected[:4])} for a {config.model_type} model")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, "
                            f"config says {tuple(expected[name].shape)}")
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, assign=True, strict=True)
    if config.tie_embeddings:  # assign=True made two Parameters; make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.init_rope(device)
    return model.eval()


def _with_source(e: UserError, source: Path) -> UserError:
    return e if str(source) in str(e) else UserError(f"{source}: {e}")


# ---- Hugging Face folders ----

def _hf_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.load(folder / "config.json")
    except UserError as e:  # e.g. heads that do not divide: name the file
        raise _with_source(e, folder / "config.json") from None


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
    return _torch_load(file, convert)


def _torch_load(file: Path, convert) -> dict:
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


# ---- Meta's original release: params.json + consolidated.NN.pth ----

# Meta split each matrix across model-parallel shards along one axis (as convert_llama_weights_to_hf.py
# concatenates them): column-parallel layers by output rows, row-parallel ones by input columns.
META_SHARD_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                   "tok_embeddings": 1}


def _read_meta(folder: Path, convert):
    state = _meta_tensors(folder)
    config = _meta_config(folder, state)
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


def _meta_tensors(folder: Path) -> dict:
    """The consolidated.NN.pth shards joined into one state dict (a single shard is used as it is)."""
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{folder}: params.json but no consolidated.*.pth weight files")
    states = [_torch_load(file, lambda t: t) for file in shards]
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


def _meta_config(folder: Path, state: dict) -> ModelConfig:
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
        raise _with_source(e, file) from None
    return config


# ---- llama.cpp's GGUF ----

GGUF_ARCHS = ("llama", "qwen2")  # our model_type has the same name; Mistral's GGUFs say llama


def _open_gguf(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(path)
    except Exception as e:  # a damaged file surfaces as ValueError, struct.error, numpy errors, ...
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _gguf_config(reader, path: Path) -> ModelConfig:
    def field(key, default=KeyError):
        f = reader.fields.get(key)
        if f is None and default is KeyError:
            raise UserError(f"{path}: missing GGUF metadata {key}")
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in GGUF_ARCHS:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only {', '.join(GGUF_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: missing tensor token_embd.weight")
    n_heads = int(field(f"{arch}.attention.head_count"))
    dim = int(field(f"{arch}.embedding_length"))
    rotary = field(f"{arch}.rope.dimension_count", dim // n_heads)
    if rotary != dim // n_heads or field(f"{arch}.attention.key_length", rotary) != rotary:
        raise UserError(f"{path}: head size or rotary width differs from embedding_length / head_count")
    scaling = field(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(f"{path}: rope scaling {scaling!r} is not supported (linear or none)")
    try:
        return ModelConfig(
            # the embedding's rows, not the token list: converters may pad the matrix past the last token
            vocab_size=int(tensors["token_embd.weight"].shape[1]), dim=dim,
            n_layers=int(field(f"{arch}.block_count")), n_heads=n_heads,
            n_kv_heads=int(field(f"{arch}.attention.head_count_kv", n_heads)),
            hidden_dim=int(field(f"{arch}.feed_forward_length")),
            norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=None if scaling == "none" else scaling,
            rope_factor=float(field(f"{arch}.rope.scaling.factor", 1.0)),
            max_seq_len=int(field(f"{arch}.context_length", 4096)),
            tie_embeddings="output.weight" not in tensors,  # llama.cpp omits the copy of a tied matrix
            qkv_bias=arch == "qwen2", model_type=arch,
            bos_token_id=field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=field("tokenizer.ggml.eos_token_id", None),
            pad_token_id=field("tokenizer.ggml.padding_token_id", None))
    except (TypeError, ValueError) as e:  # a list where a number belongs (per-layer head counts, ...)
        raise UserError(f"{path}: GGUF metadata of a shape we do not support ({e})") from None
    except UserError as e:
        raise _with_source(e, path) from None


def _read_gguf(path: Path, convert):
    import numpy as np
    from gguf.quants import dequantize
    from tqdm import tqdm

    reader = _open_gguf(path)
    config = _gguf_config(reader, path)
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"reading {path.name}", unit="tensor", leave=False, disable=None):
        name = our_name(t.name, GGUF)
        if name is None:
            raise UserError(f"{path}: unknown tensor {t.name} (for rope_freqs: Llama 3 scaling is not supported)")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantize") from None
        # ggml lists dimensions fastest first (ne[0] = row length): reversed, they are PyTorch's order
        shape = tuple(int(n) for n in reversed(t.shape))
        # copied when it is still the read-only file mapping (F32 tensors), so the model may be trained
        w = torch.from_numpy(np.require(w.reshape(shape), np.float32, ["C", "W"]))
        # llama.cpp permutes q/k rows for the llama arch only (qwen2 runs rotate-half rope as it is)
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = interleaved_to_half(w, config.n_heads if "q_proj" in name else config.n_kv_heads)
        tensors[name] = convert(w)
    return config, tensors


# ---- saving our folder ----

def save_model(model: Llama, folder, tokenizer=None, max_shard_size: int = 2 * 1024**3) -> Path:
    """Write a Hugging Face folder that transformers' from_pretrained reads, atomically.

    Everything goes to a temporary folder beside the target first, then is swapped into place, so a crash
    leaves either the old checkpoint or the new one, never a mix.
    """
    folder = Path(folder)
    # replacing a folder deletes what was in it: only ever replace a checkpoint
    if folder.is_file() or folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").exists():
        raise UserError(f"{folder}: exists and is not a checkpoint folder; choose a new or empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # beside the target, on the same file system, so the final rename is atomic
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_weights(model, tmp, max_shard_size)
        _write_json(tmp / "config.json", _config_json(model))
        c = model.config
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
                     "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id})
        if tokenizer is not None:
            tokenizer.save(tmp)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _config_json(model: Llama) -> dict:
    config = model.config
    d = config.to_hf()
    d["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return d


def _write_weights(model: Llama, folder: Path, max_shard_size: int) -> None:
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


def _write_json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=2) + "\n")


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Two renames: the old folder steps aside (kept until the new one is in place), the new one steps in."""
    if not folder.exists():
        os.rename(tmp, folder)
        return
    old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old)


# ---- `minillama convert SRC DST` ----

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF folder, .gguf or Meta folder into our HF-layout folder",
                       description="Write SRC (HF folder, .gguf, or Meta params.json + consolidated.*.pth) as a "
                                   "Hugging Face folder DST, with the tokenizer SRC carries.")
    p.add_argument("src", help="checkpoint folder or .gguf file to read")
    p.add_argument("dst", help="folder to write (replaced atomically if it is a checkpoint already)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype of DST (default float32)")
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="split weights into files of at most this many GB (default 2)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer")
    p.set_defaults(run=convert_command)


def convert_command(args) -> int:
    model = load_model(args.src, dtype=DTYPES[args.dtype])
    tokenizer = None
    if not args.no_tokenizer:
        from minillama.tokenizer import load_tokenizer
        try:
            tokenizer = load_tokenizer(args.src)
        except UserError as e:  # a checkpoint without a tokenizer is still worth converting
            print(f"note: no tokenizer written ({e})")
    save_model(model, args.dst, tokenizer, max_shard_size=int(args.max_shard_gb * 1024**3))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {n_params / 1e6:.1f}M parameters in {args.dtype}"
          f"{', with tokenizer' if tokenizer else ''}")
    return 0
