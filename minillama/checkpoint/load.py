"""The loader: a model name or path -> a model (and its tokenizer), whatever the format.

`load_model(path)` reads
  a HF folder   LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: config.json + safetensors
                (single or sharded) or pytorch_model.bin                                   (hf.py)
  a .gguf file  llama.cpp's format, architectures llama and qwen2, dequantized to float    (gguf.py)
  a Meta folder params.json + consolidated.NN.pth (Llama 2's original release)             (meta.py)
It builds the model without initializing it and assigns the tensors it reads, so the weights exist once.
`load_model_and_tokenizer(name)` is what the commands use: it also resolves `smollm2` to the GGUF that
assets fetches, and applies the speed transforms the caller chose.
"""

import contextlib
import gc
from pathlib import Path

import torch

from minillama.checkpoint.gguf import Blocks, gguf_config, open_gguf, read_gguf, read_prepared
from minillama.checkpoint.hf import read_config, read_folder, save_model
from minillama.checkpoint.meta import meta_config, meta_tensors, read_meta
from minillama.config import ModelConfig, UserError
from minillama.model import Llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_HELP = "Hugging Face folder, .gguf file, Meta checkpoint folder, or smollm2"


def load_model(path, dtype=torch.float32, device="cpu", keep_blocks: bool = False) -> Llama:
    """A HF folder, a .gguf file or a Meta folder -> Llama in eval mode, weights in `dtype` on `device`.
    keep_blocks: a GGUF's quantized tensors stay as stored (perf/fast.py), read through its prepared folder."""
    path = Path(path)
    convert = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731  (each tensor as it is read)
    kind = _kind(path)
    if kind == "gguf" and keep_blocks:
        config, tensors = read_prepared(path, convert)
    else:
        config, tensors = {"hf": read_folder, "gguf": read_gguf, "meta": read_meta}[kind](path, convert)
    return _assemble(config, tensors, path, device)


def load_config(path) -> ModelConfig:
    """Only the ModelConfig of a checkpoint (a GGUF's metadata, a Meta folder's params + tensor shapes), or
    of a config JSON file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return read_config(path)
    kind = _kind(path)
    if kind == "hf":
        return read_config(path)
    if kind == "gguf":
        return gguf_config(open_gguf(path), path)
    return meta_config(path, meta_tensors(path))


def resolve_model_path(name: str) -> Path:
    """A model argument -> its path; `smollm2` names the SmolLM2-135M-Instruct GGUF that assets fetches."""
    if name == "smollm2":
        from minillama.data.assets import smollm2_gguf

        return smollm2_gguf()
    if not Path(name).exists():
        raise UserError(f"{name}: no such checkpoint file or folder (the model does not exist); give a {MODEL_HELP}")
    return Path(name)


def load_model_and_tokenizer(name: str, dtype: str = "auto", quantize: str | None = None, plain: bool = False,
                             tokenizer_required: bool = True):
    """(model, tokenizer) for a model argument, on the fastest path the weights and the CPU allow:
    GGUF blocks stay quantized, bf16 checkpoints stay bf16, fp32 ones decode with the fp32 kernel
    (perf/fast.py). dtype: auto (as stored) | float32 | bfloat16 for the matmul weights; quantize: q8_0 |
    q4_0 | q4_1 to quantize them here; plain: no speed-up at all, every weight dequantized to float32
    (or `dtype`), the reference the fast path is tested against. With tokenizer_required=False a
    checkpoint without tokenizer files gives (model, None)."""
    from minillama.perf import fast
    from minillama.tokenizer import load_tokenizer

    path = resolve_model_path(name)
    if plain:
        model = load_model(path, dtype=DTYPES["float32" if dtype == "auto" else dtype])
    else:
        model = load_model(path, keep_blocks=True)
        if dtype == "bfloat16" or dtype == "auto" and _stored_dtype(path) == "bfloat16":
            fast.to_bf16_weights(model)
        if quantize:
            fast.quantize_model(model, quantize)
        fast.make_fast(model)
    tokenizer_path = path
    if _kind(path) == "gguf" and not plain:  # its vocabulary was saved by the prepared folder
        from minillama.checkpoint.gguf import prepared

        tokenizer_path = prepared(path) / "tokenizer"
    try:
        return model, load_tokenizer(tokenizer_path)
    except UserError:
        if tokenizer_required:
            raise UserError(f"{path}: no tokenizer in this checkpoint") from None
        return model, None


def _stored_dtype(path: Path) -> str | None:
    """The dtype a Hugging Face folder says its weights are in (config.json's torch_dtype)."""
    import json

    if _kind(path) != "hf":
        return None
    config = json.loads((path / "config.json").read_text())
    return config.get("torch_dtype") or config.get("dtype")


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
    """Build the model without memory (meta device) and hand it the tensors: no second copy of the weights.
    GGUF blocks (gguf.Blocks) become the quantized modules of perf/fast.py in place of plain ones."""
    with _uninitialized():
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
        shape = _shape(t)
        if shape != expected[name].shape:
            raise UserError(f"{source}: tensor {name} has shape {tuple(shape)}, config says {tuple(expected[name].shape)}")
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    for name in [n for n, t in tensors.items() if isinstance(t, Blocks)]:
        _use_blocks(model, name.removesuffix(".weight"), tensors.pop(name), config.dim)
    model.load_state_dict(tensors, assign=True, strict=False)
    if config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):  # assign=True made two Parameters
        model.lm_head.weight = model.model.embed_tokens.weight
    if device != "cpu":
        model.model.init_rope(device)
    return model.eval()


@contextlib.contextmanager
def _uninitialized():
    """Modules built inside keep their weights as torch.empty left them: memory that is never touched is
    never resident, and the tensors read replace them. (The meta device would do the same, but its first
    use imports ~800 modules, sympy among them: +70 MB and a second before the first token.)"""
    saved = torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters
    torch.nn.Linear.reset_parameters = torch.nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters = saved


def _shape(t) -> torch.Size:
    if isinstance(t, Blocks):  # (rows, row bytes) -> (rows, weights per row)
        from minillama.perf.fast import BLOCK_BYTES

        return torch.Size([t.data.shape[0], t.data.shape[1] // BLOCK_BYTES[t.kind] * 32])
    return t.shape


def _use_blocks(model: Llama, module_name: str, blocks: Blocks, dim: int) -> None:
    """Put the module of perf/fast.py that multiplies (or looks up) these blocks where `module_name` is."""
    from minillama.perf.fast import GGMLEmbedding, GGMLLinear

    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    if isinstance(old, torch.nn.Embedding):
        new = GGMLEmbedding(blocks.data, blocks.kind, dim)
    else:
        new = GGMLLinear(blocks.data, blocks.kind, old.in_features, old.bias)
    setattr(parent, child, new)


def model_flags(p) -> None:
    """The model argument and how to load it, for every command that runs a model."""
    p.add_argument("path", metavar="PATH", help=MODEL_HELP)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="matmul weights: as the checkpoint stores them (auto; GGUF blocks stay quantized), "
                        "float32 or bfloat16")
    p.add_argument("--quantize", choices=["q8_0", "q4_0", "q4_1"], default=None,
                   help="quantize the matmul weights to these GGUF blocks when loading")
    p.add_argument("--plain", action="store_true",
                   help="no speed-ups: every weight dequantized to float32, plain PyTorch (for debugging)")


def load_from_flags(args, tokenizer_required: bool = True):
    """load_model_and_tokenizer with what model_flags parsed, for a command that then runs it until exit."""
    loaded = load_model_and_tokenizer(args.path, args.dtype, args.quantize, args.plain, tokenizer_required)
    # The model's thousands of objects live until the process ends: frozen, the garbage collector stops
    # walking them whenever a few hundred new objects appear (7% of a batch-8 decode step, measured)
    gc.freeze()
    return loaded


# ---- `minillama convert SRC DST` ----

def convert_flags(p) -> None:
    from minillama.checkpoint.gguf_export import TYPES

    p.add_argument("src", help="checkpoint folder or .gguf file to read")
    p.add_argument("dst", help="folder to write (replaced atomically if it is a checkpoint already), or a .gguf "
                               "file for llama.cpp")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype of a folder DST (default float32)")
    p.add_argument("--type", choices=TYPES, default=None,
                   help="matrix type of a .gguf DST (default f32; norms and biases stay f32)")
    p.add_argument("--force", action="store_true", help="replace a .gguf DST that exists")
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="split weights into files of at most this many GB (default 2)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy the tokenizer")


def convert_command(args) -> None:
    if args.dst.endswith(".gguf"):
        from minillama.checkpoint.gguf_export import convert_to_gguf

        return convert_to_gguf(args)
    if args.type is not None or args.force:
        raise UserError("--type and --force are for a .gguf DST; a folder takes --dtype")
    args.dtype = args.dtype or "float32"
    model, tokenizer = load_model_and_tokenizer(args.src, args.dtype, plain=True, tokenizer_required=False)
    if args.no_tokenizer:
        tokenizer = None
    elif tokenizer is None:  # a checkpoint without a tokenizer is still worth converting
        print(f"note: {args.src} has no tokenizer files; none written")
    save_model(model, args.dst, tokenizer, max_shard_size=int(args.max_shard_gb * 1024**3))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {n_params / 1e6:.1f}M parameters in {args.dtype}"
          f"{', with tokenizer' if tokenizer else ''}")
