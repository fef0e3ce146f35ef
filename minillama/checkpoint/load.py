"""The loader: a model name or path -> a model (and its tokenizer), whatever the format.

`load_model(path)` reads
  a HF folder   LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: config.json + safetensors
                (single or sharded) or pytorch_model.bin                                   (hf.py)
  a .gguf file  llama.cpp's format, architectures llama and qwen2, dequantized to float    (gguf.py)
  a Meta folder params.json + consolidated.NN.pth (Llama 2's original release)             (meta.py)
It builds the model on the meta device and assigns the tensors it reads, so the weights exist once.
`load_model_and_tokenizer(name)` is what the commands use: it also resolves `smollm2` to the GGUF that
assets fetches, and applies the speed transforms the caller chose.
"""

from pathlib import Path

import torch

from minillama.checkpoint.gguf import gguf_config, open_gguf, read_gguf
from minillama.checkpoint.hf import read_config, read_folder, save_model
from minillama.checkpoint.meta import meta_config, meta_tensors, read_meta
from minillama.config import ModelConfig, UserError
from minillama.model import Llama

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPEEDS = ("plain", "fast", "int8")  # see load_model_and_tokenizer
MODEL_HELP = "Hugging Face folder, .gguf file, Meta checkpoint folder, or smollm2"


def load_model(path, dtype=torch.float32, device="cpu") -> Llama:
    """A HF folder, a .gguf file or a Meta folder -> Llama in eval mode, weights in `dtype` on `device`."""
    path = Path(path)
    convert = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731  (each tensor as it is read)
    kind = _kind(path)
    reader = {"hf": read_folder, "gguf": read_gguf, "meta": read_meta}[kind]
    config, tensors = reader(path, convert)
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


def load_model_and_tokenizer(name: str, dtype: str = "float32", speed: str = "plain", tokenizer_required=True):
    """(model, tokenizer) for a model argument. speed: plain, or an opt-in transform from perf/: fast (fp32
    matrix-vector kernel + torch.compile), int8 (int8 weights, bf16 activations). With
    tokenizer_required=False a checkpoint without tokenizer files gives (model, None)."""
    from minillama.tokenizer import load_tokenizer

    path = resolve_model_path(name)
    model = load_model(path, dtype=DTYPES[dtype]).eval()
    if speed == "fast":
        from minillama.perf.compile import apply_compile
        from minillama.perf.gemv import apply_fast_linear

        model = apply_compile(apply_fast_linear(model))
    elif speed == "int8":
        from minillama.perf.quantize import apply_int8

        model = apply_int8(model)
    try:
        return model, load_tokenizer(path)
    except UserError:
        if tokenizer_required:
            raise
        return model, None


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


def model_flags(p) -> None:
    """The model argument and how to load it, for every command that runs a model."""
    p.add_argument("path", metavar="PATH", help=MODEL_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and KV cache (default float32)")
    p.add_argument("--speed", choices=SPEEDS, default="plain",
                   help="opt-in speed transform: fast = fp32 matrix-vector kernel + torch.compile (compiles "
                        "once, needs g++), int8 = int8 weights (default plain)")


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
    model, tokenizer = load_model_and_tokenizer(args.src, args.dtype, tokenizer_required=False)
    if args.no_tokenizer:
        tokenizer = None
    elif tokenizer is None:  # a checkpoint without a tokenizer is still worth converting
        print(f"note: {args.src} has no tokenizer files; none written")
    save_model(model, args.dst, tokenizer, max_shard_size=int(args.max_shard_gb * 1024**3))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {n_params / 1e6:.1f}M parameters in {args.dtype}"
          f"{', with tokenizer' if tokenizer else ''}")
