"""llama.cpp's GGUF files: the model's metadata and tensors, read with the `gguf` package (the one GGUF
reader in minillama; the tokenizer reads its vocabulary through `gguf_metadata`)."""

import dataclasses
from dataclasses import dataclass
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
        return GGUFReader(path, mode="c")  # copy-on-write: tensors are writable views, never written
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


@dataclass(frozen=True)
class Blocks:
    """A quantized GGUF tensor kept as its blocks: kind q8_0 | q4_0 | q4_1, data (rows, row bytes) uint8."""
    kind: str
    data: torch.Tensor


KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}  # block types the fast path multiplies as they are


def read_gguf(path: Path, convert, keep_blocks: bool = False):
    """(ModelConfig, {our name: tensor}) of a GGUF file. Tensors are dequantized to float32 and passed
    through `convert`, or with keep_blocks, Q8_0/Q4_0/Q4_1 tensors stay Blocks and BF16 ones bf16."""
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    return config, gguf_tensors(path, reader.data, tensor_index(reader, path), config, convert, keep_blocks)


def tensor_index(reader, path: Path) -> dict:
    """{our name: (GGML type name, PyTorch shape, byte offset in the file, byte size)} of every tensor."""
    index = {}
    for t in reader.tensors:
        name = our_name(t.name, GGUF)
        if name is None:
            raise UserError(f"{path}: unknown tensor {t.name} (for rope_freqs: Llama 3 scaling is not supported)")
        # ggml lists dimensions fastest first (ne[0] = row length): reversed, they are PyTorch's order
        shape = [int(n) for n in reversed(t.shape)]
        index[name] = (t.tensor_type.name, shape, int(t.data_offset), int(t.n_bytes))
    return index


def gguf_tensors(path: Path, data, index: dict, config: ModelConfig, convert, keep_blocks: bool) -> dict:
    """The tensors of `index` read from `data`, the file's bytes (a copy-on-write memory map: nothing is
    read until used, and a tensor kept as it is stored is never copied)."""
    import numpy as np

    tensors = {}
    for name, (kind, shape, offset, size) in index.items():
        # llama.cpp permutes q/k rows for the llama arch only (qwen2 runs rotate-half rope as it is)
        permuted = config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight"))
        # a tensor that is reordered below is read, not mapped: its mapped pages would stay resident beside
        # the reordered copy (8 MB of SmolLM2's Q4_1 file, 57 MB of a 110M model's f32 one)
        raw = np.fromfile(path, dtype=np.uint8, count=size, offset=offset) if permuted else data[offset:offset + size]
        if keep_blocks and kind in KEPT:
            t = Blocks(KEPT[kind], torch.from_numpy(raw.reshape(shape[0], -1)))
        elif keep_blocks and kind == "BF16":
            t = torch.from_numpy(raw.view(np.int16).reshape(shape)).view(torch.bfloat16)
        elif kind == "F32":
            t = convert(torch.from_numpy(raw.view(np.float32).reshape(shape)))
        else:  # the gguf package only here: with its vocabulary helpers it costs ~20 MB and 40 ms to import
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            try:
                t = convert(torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(shape)))
            except NotImplementedError:
                raise UserError(f"{path}: tensor {name} is {kind}, which gguf cannot dequantize") from None
        if permuted:
            heads = config.n_heads if "q_proj" in name else config.n_kv_heads
            t = Blocks(t.kind, interleaved_to_half(t.data, heads)) if isinstance(t, Blocks) else \
                interleaved_to_half(t, heads)
        tensors[name] = t
    return tensors


# ---- prepared once: what loading needs without parsing the whole header again ----

def prepared(path: Path) -> Path:
    """A cache folder for this GGUF file (keyed by its path, size and time): config.json, tokenizer/ and
    tensors.json (every tensor's type, shape and place in the file). The gguf package parses the header,
    all of its 50k-token vocabulary, in ~4 s; with this folder a load reads none of it: ~0.3 s."""
    import hashlib
    import json
    import sys

    from minillama.checkpoint.atomic import atomic_folder
    from minillama.data.assets import cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    # ModelConfig's field names too: a folder written before they changed would not load
    fields = ",".join(f.name for f in dataclasses.fields(ModelConfig))
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{fields}".encode()).hexdigest()[:16]
    folder = cache_dir() / "prepared" / f"{path.stem}-{key}"
    if (folder / "tensors.json").exists():
        return folder
    print(f"preparing {path.name} for fast loading (once, into {folder}) ...", file=sys.stderr)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
        try:
            from minillama.tokenizer.vocab import load_gguf

            load_gguf(path, reader).save(tmp / "tokenizer")
        except UserError as e:  # a GGUF without a vocabulary still runs on token ids
            (tmp / "no-tokenizer.txt").write_text(f"{e}\n")
        (tmp / "tensors.json").write_text(json.dumps(tensor_index(reader, path)) + "\n")
    return folder


def read_prepared(path: Path, convert, keep_blocks: bool = True):
    """(ModelConfig, tensors) of a GGUF file through its prepared folder."""
    import json

    import numpy as np

    folder = prepared(path)
    config = ModelConfig(**json.loads((folder / "config.json").read_text()))
    index = json.loads((folder / "tensors.json").read_text())
    data = np.memmap(path, dtype=np.uint8, mode="c")
    return config, gguf_tensors(path, data, index, config, convert, keep_blocks)


def gguf_metadata(path, reader=None) -> dict:
    """The key/value header of a GGUF file as a dict of Python values (the tensors are not read)."""
    reader = reader or open_gguf(Path(path))
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
