"""The C++ decode kernels: matrix times a few rows of activations, at the machine's memory bandwidth.

Decoding reads every weight once per step for 1..8 rows of activations, so its speed is bytes read /
bandwidth. torch's CPU kernels fall short there (measured on 2 Zen 5 cores, numbers in perf/__init__.py):
fp32 `F.linear` of one row streams weights at ~14 GB/s (MKL's single-threaded gemv),
bf16 `F.linear` of one row is no faster than fp32 at these sizes, there is no matmul over GGUF's Q8_0
blocks (one scale per 32 weights), and the int4 kernel is fast only with bf16 activations and a
CPU-specific repacked copy of the weights. So, llama2.c's `matmul` loop, one output row per dot product,
rows split between threads by at::parallel_for, 16 floats per SIMD step (GCC vector types: AVX-512 or
AVX2, whatever the CPU has), each weight read once and used for every activation row (M <= 8), fp32
accumulation:

  rows_f32   weights fp32                        (M, K) x (N, K) -> (M, N)
  rows_bf16  weights bf16, widened to fp32 in registers
  rows_q8_0  GGUF Q8_0 blocks (34 bytes: fp16 d, 32 int8 q):            w = d·q
  rows_q4_0  GGUF Q4_0 blocks (18 bytes: fp16 d, 16 bytes of nibbles):   w = d·(q − 8)
  rows_q4_1  GGUF Q4_1 blocks (20 bytes: fp16 d, fp16 m, 16 bytes):      w = d·q + m
  (llama.cpp's ggml-common.h; in a block, byte j's low nibble is weight j, its high nibble weight j + 16)

The block kernels read the bytes as the .gguf file stores them (memory-mapped, never repacked). Float
and Q8_0 weights are exact up to fp32 summation order against the dequantized weights; Q4 weights, on a
CPU with AVX512-VNNI, meet activations held as integers, rounded twice to int8 (~15 bits) and kept as one
int16 (1.3x faster at batch 1, 1.6x at 8 rows; `round_activations` is that rounding in torch, the tests'
reference). Built once with the system's C++
compiler into the cache folder; `available()` is False when that fails, and callers fall back to torch.
"""

import sys
from pathlib import Path

import torch

MAX_ROWS = 8  # activation rows the kernels take per call; more rows (prefill) go to torch's GEMM

SOURCE = (Path(__file__).parent / "kernels.cpp").read_text()  # the C++ beside this file, built once

KINDS = {"f32": 0, "bf16": 1, "q8_0": 2, "q4_0": 3, "q4_1": 4}
_module = None  # the built extension, or False when it could not be built


def _build():
    global _module
    if _module is None:
        import hashlib
        import importlib.util

        from minillama.data.assets import cache_dir

        source = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
        folder = cache_dir() / "kernels" / f"torch-{torch.__version__}-{source}"
        folder.mkdir(parents=True, exist_ok=True)
        built = folder / "minillama_kernels.so"
        try:
            if built.exists():  # import it directly: cpp_extension and its ninja check cost ~0.3 s
                spec = importlib.util.spec_from_file_location("minillama_kernels", built)
                _module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_module)
            else:
                from torch.utils.cpp_extension import load_inline

                print(f"building the decode kernels with the C++ compiler (once, cached in {folder}) ...",
                      file=sys.stderr)
                _module = load_inline("minillama_kernels", cpp_sources=SOURCE,
                                      functions=["linear_rows", "attn_in", "layer_out", "decode_layers", "int8_dots"],
                                      build_directory=str(folder), extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                      extra_ldflags=["-fopenmp"])  # at::parallel_for is OpenMP pragmas
        except (RuntimeError, OSError, ImportError) as e:  # no compiler, or it failed
            print(f"note: could not build the decode kernels ({str(e).splitlines()[0][:120]}); using torch's "
                  "slower paths. Install g++ for the fast ones.", file=sys.stderr)
            _module = False
    return _module


def module():
    """The built extension: linear_rows, and attn_in / layer_out for perf/fast.py's decoder layer."""
    return _build()


def available() -> bool:
    """Whether the kernels are built (building them now if they were not)."""
    return bool(_build())


def linear_rows(x: torch.Tensor, weight: torch.Tensor, kind: str, out_features: int) -> torch.Tensor:
    """x (M, K) fp32, M <= 8 -> x · Wᵀ (M, N), W held as `kind` (f32, bf16, q8_0, q4_0, q4_1) in the raw
    rows `weight` (N, row bytes or elements). A plain call into the extension: wrapping it as a
    torch.library custom op (for torch.compile) costs ~70 MB of imports on its first call."""
    return _build().linear_rows(x.contiguous(), weight, KINDS[kind], out_features)


def int8_dots() -> bool:
    """Whether Q4 weights are multiplied with activations held as two int8 parts (CPUs with AVX512-VNNI)."""
    return bool(_build()) and _build().int8_dots()


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the Q4 kernels see it with int8_dots(): each block of 32 as d·(q1 + q2/254), d =
    max|x| / 127, q1 = round(x/d), q2 = round((x - d·q1)·254/d); an odd last block stays as it is."""
    M, K = x.shape
    even = K // 64 * 64
    blocks = x[:, :even].reshape(M, -1, 32)  # (M, blocks, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127  # (M, blocks, 1)
    inv = torch.where(d > 0, 1 / d, 0)
    q1 = torch.round(blocks * inv)
    rest = (blocks.double() - q1.double() * d.double()).float()  # exact, then rounded once: C++'s fma
    q2 = torch.round(rest * inv * 254)
    return torch.cat([(d * (q1 + q2 / 254)).reshape(M, even), x[:, even:]], dim=1)
