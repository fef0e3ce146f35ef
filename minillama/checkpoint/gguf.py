"""llama.cpp's GGUF files: the model's metadata and tensors, read with the `gguf` package (the one GGUF
reader in minillama; the tokenizer reads its vocabulary through `gguf_metadata`)."""

from pathlib import Path

import torch

from minillama.checkpoint.names import GGUF, interleaved_to_half, our_name
from minillama.config import ModelConfig, RopeScaling, UserError

GGUF_ARCHS = ("llama", "qwen2")  # our model_type has the same name; Mistral's GGUFs say llama


def open_gguf(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(path)
    except Exception as e:  # a damaged file surfaces as ValueError, struct.error, numpy errors, ...
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_config(reader, path: Path) -> ModelConfig:
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
            rope_scaling=None if scaling == "none"
            else RopeScaling(scaling, float(field(f"{arch}.rope.scaling.factor", 1.0))),
            max_seq_len=int(field(f"{arch}.context_length", 4096)),
            tie_embeddings="output.weight" not in tensors,  # llama.cpp omits the copy of a tied matrix
            qkv_bias=arch == "qwen2", model_type=arch,
            bos_token_id=field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=field("tokenizer.ggml.eos_token_id", None),
            pad_token_id=field("tokenizer.ggml.padding_token_id", None))
    except (TypeError, ValueError) as e:  # a list where a number belongs (per-layer head counts, ...)
        raise UserError(f"{path}: GGUF metadata of a shape we do not support ({e})") from None
    except UserError as e:
        raise e.naming(path) from None


def read_gguf(path: Path, convert):
    """(ModelConfig, {our name: tensor}) of a GGUF file, every tensor dequantized to float32 and passed
    through `convert`."""
    import numpy as np
    from gguf.quants import dequantize
    from tqdm import tqdm

    reader = open_gguf(path)
    config = gguf_config(reader, path)
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


def gguf_metadata(path) -> dict:
    """The key/value header of a GGUF file as a dict of Python values (the tensors are not read)."""
    reader = open_gguf(Path(path))
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
