"""Writing llama.cpp's GGUF: any checkpoint minillama loads, and its tokenizer, as one .gguf file that
llama.cpp, Ollama, LM Studio and llama-cpp-python run, written with the `gguf` package's GGUFWriter and
quantizers (gguf.quants), the ones llama.cpp's own convert_hf_to_gguf.py uses.

What llama.cpp reads (src/llama-model.cpp; convert_hf_to_gguf.py writes the same):
- the shape under the architecture's name: llama (Mistral's models too: llama.cpp runs them as llama)
  or qwen2 (q/k/v biases); tensor names from names.py's GGUF column, the tied output matrix left out
  (llama.cpp then reuses token_embd);
- for the llama arch, q/k rows in interleaved rotary pairs (names.half_to_interleaved), the order of
  Meta's checkpoints and of llama.cpp's llama rope; qwen2 keeps rotate-half (llama.cpp runs NEOX rope);
- matrices in the chosen type, vectors (norms, biases) in f32 as llama.cpp's converter keeps them. A matrix
  whose rows do not split into blocks of 32 values cannot be q8_0/q4_0/q4_1: it is written in f16 and a
  note names it, the fallback convert_hf_to_gguf.py takes too;
- the tokenizer in the metadata (tokenizer/gguf_vocab.py).
`minillama convert SRC out.gguf --type q8_0` runs convert_to_gguf; checkpoint/gguf.py reads the file back.
"""

import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from minillama.checkpoint.atomic import atomic_file
from minillama.checkpoint.names import GGUF, foreign_name, half_to_interleaved
from minillama.config import ModelConfig, UserError

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
# general.file_type: what most tensors are (llama.cpp prints it; tools sort models by it)
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
# our model_type -> llama.cpp's architecture
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def export_gguf(model, tokenizer, path, type: str = "f32", *, force: bool = False, name: str | None = None) -> Path:
    """Write `model` (a minillama Llama) and `tokenizer` (or None: no vocabulary) to the .gguf `path`,
    matrices in `type` (f32, f16, bf16, q8_0, q4_0, q4_1); atomically, and over an existing file only
    with force=True."""
    path = Path(path)
    check_destination(path, type, force)
    config = model.config
    arch = gguf_arch(config)
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or path.stem)
    add_hparams(writer, config, context_length(config), type)
    if tokenizer is not None:
        from minillama.tokenizer.gguf_vocab import add_vocab

        add_vocab(writer, tokenizer, config.vocab_size)
    else:
        writer.add_tokenizer_model("no_vocab")  # llama.cpp then runs ids only
    kept = []
    for gguf_name, data, qtype in gguf_tensors(model, TYPES[type], arch):
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        if qtype == Q.F16 != TYPES[type]:  # a matrix quantize() kept in f16
            kept.append(f"{gguf_name} (rows of {data.shape[-1]})")
    if kept:
        block = gguf.GGML_QUANT_SIZES[TYPES[type]][0]
        print(f"note: rows not a multiple of {block} values cannot be {type}; kept in f16: {', '.join(kept)}",
              file=sys.stderr)
    with atomic_file(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def check_destination(path: Path, type: str, force: bool) -> None:
    if type not in TYPES:
        raise UserError(f"--type {type!r}: use one of {', '.join(TYPES)}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a .gguf file name")
    if path.exists() and not force:
        raise UserError(f"{path}: exists; give --force to replace it")


def gguf_arch(config: ModelConfig) -> str:
    if config.model_type not in ARCHS:
        raise UserError(f"model_type {config.model_type!r} has no llama.cpp architecture (supported: "
                        f"{', '.join(ARCHS)})")
    return ARCHS[config.model_type]


def context_length(config: ModelConfig) -> int:
    """The context llama.cpp is told: the model's, or its sliding window if smaller, since llama.cpp's llama
    and qwen2 attend to every earlier token: within the window that is the same computation."""
    if config.sliding_window is not None and config.sliding_window < config.max_seq_len:
        print(f"note: llama.cpp's {gguf_arch(config)} architecture has no sliding window: the file says "
              f"context_length {config.sliding_window} (the window), not {config.max_seq_len}", file=sys.stderr)
        return config.sliding_window
    return config.max_seq_len


def add_hparams(writer, config: ModelConfig, context: int, type: str) -> None:
    """The model's shape under `{arch}.` keys (what checkpoint/gguf.py's gguf_config reads back)."""
    from minillama.model.rope import rope_base

    writer.add_context_length(context)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(rope_base(config))  # NTK-aware scaling is only a larger base (as in HF's config)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    s = config.rope_scaling
    if s is not None and s.type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(s.factor)
    elif s is not None and s.type != "ntk" or config.position_encoding != "rope":
        raise UserError(f"GGUF export writes RoPE plain, linear or ntk; this model has "
                        f"{s.type if s is not None else config.position_encoding}, which llama.cpp would not run as "
                        "minillama does")
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_tensors(model, qtype, arch: str):
    """(GGUF name, data, stored type) of every weight, in the model's order."""
    config = model.config
    state = model.state_dict()
    if config.tie_embeddings:
        del state["lm_head.weight"]  # the embedding itself: llama.cpp reuses token_embd when output is absent
    for name, t in state.items():
        gguf_name = foreign_name(name, GGUF)
        if gguf_name is None:
            raise UserError(f"tensor {name} has no place in llama.cpp's {arch} architecture (a language model: "
                            "embedding, decoder layers, norm, LM head)")
        w = t.detach().to("cpu", torch.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = half_to_interleaved(w, config.n_heads if "q_proj" in name else config.n_kv_heads)
        # the matrix that makes the logits (the embedding when tied) is the most sensitive: llama.cpp's
        # quantize keeps it at 6 or 8 bits for 4-bit types (llama_tensor_get_type; SmolLM2's Q4_1 file has
        # token_embd in Q8_0). 4-bit exports keep it at q8_0 (gguf.quants writes no k-quants)
        head = name == ("model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight")
        yield (gguf_name, *quantize(w.contiguous().numpy(), Q.Q8_0 if head and qtype in (Q.Q4_0, Q.Q4_1) else qtype))


def quantize(w: np.ndarray, qtype):
    """(data, stored type): vectors stay f32; a matrix whose rows are not whole blocks falls back to f16.
    Quantized data is bytes, (rows, bytes per row), as GGUFWriter.add_tensor takes it with raw_dtype."""
    if w.ndim == 1:
        return w, Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        qtype = Q.F16
    return gguf.quants.quantize(w, qtype), qtype


# ---- `minillama convert SRC out.gguf` ----

def convert_to_gguf(args) -> None:
    """convert_command's path for a .gguf destination (checkpoint/load.py dispatches here)."""
    from minillama.checkpoint.load import load_config, load_model_and_tokenizer, resolve_model_path

    if args.dtype is not None:
        raise UserError("--dtype sets a folder's weights; for a .gguf give --type (f32, f16, bf16, q8_0, ...)")
    dst, args.type = Path(args.dst), args.type or "f32"
    check_destination(dst, args.type, args.force)  # before the (slow) load
    gguf_arch(load_config(resolve_model_path(args.src)))
    model, tokenizer = load_model_and_tokenizer(args.src, "float32", plain=True, tokenizer_required=False)
    if args.no_tokenizer:
        tokenizer = None
    elif tokenizer is None:
        print(f"note: {args.src} has no tokenizer files; the GGUF has no vocabulary (llama.cpp runs ids only)")
    export_gguf(model, tokenizer, dst, args.type, force=args.force)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst}: {n_params / 1e6:.1f}M parameters in {args.type} ({dst.stat().st_size / 1e6:.1f} MB)"
          f"{', with tokenizer' if tokenizer else ''}")
