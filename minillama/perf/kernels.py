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

The block kernels read the bytes as the .gguf file stores them (memory-mapped, never repacked) and are
exact up to fp32 summation order against the dequantized weights. Built once with the system's C++
compiler into the cache folder; `available()` is False when that fails, and callers fall back to torch.
"""

import sys

import torch

MAX_ROWS = 8  # activation rows the kernels take per call; more rows (prefill) go to torch's GEMM

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

typedef float vf __attribute__((vector_size(64)));          // 16 floats: one AVX-512 register
typedef int32_t vi __attribute__((vector_size(64)));
typedef int8_t vb __attribute__((vector_size(16)));
typedef uint8_t vub __attribute__((vector_size(16)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));

static inline float sum16(vf v) {  // a tree of adds, not a chain of 16
  float s[16]; std::memcpy(s, &v, 64);
  for (int w = 8; w > 0; w /= 2) for (int k = 0; k < w; k++) s[k] += s[k + w];
  return s[0];
}
static inline float half(const uint8_t* p) { _Float16 h; std::memcpy(&h, p, 2); return (float)h; }
static inline vf loadf(const float* p) { vf v; std::memcpy(&v, p, 64); return v; }
static inline vf widen_i8(const uint8_t* p) { vb b; std::memcpy(&b, p, 16); return __builtin_convertvector(__builtin_convertvector(b, vi), vf); }
static inline vf widen_u8(vub b) { return __builtin_convertvector(__builtin_convertvector(b, vi), vf); }
static inline vf widen_bf16(const uint16_t* p) {  // bf16 is the top half of an fp32
  vh h; std::memcpy(&h, p, 32); vu u = __builtin_convertvector(h, vu) << 16; vf f; std::memcpy(&f, &u, 64); return f;
}

enum Kind { F32, BF16, Q8_0, Q4_0, Q4_1 };

// y[m, n] for rows n in [n0, n1): each weight row is decoded once and used for the M activation rows.
// xs[m * nb + b] = sum of the 32 activations of block b (for the zero points of Q4_0 / Q4_1).
template <int M, int KIND>
static void rows(const float* x, const float* xs, const uint8_t* w, int64_t row_bytes, float* y,
                 int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / 32;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* r = w + n * row_bytes;
    vf acc[M] = {};
    float off[M] = {};
    for (int64_t b = 0; b < nb; b++) {
      vf w0, w1; float d = 1.f, zero = 0.f;
      if (KIND == F32) { w0 = loadf((const float*)r + 32 * b); w1 = loadf((const float*)r + 32 * b + 16); }
      if (KIND == BF16) { w0 = widen_bf16((const uint16_t*)r + 32 * b); w1 = widen_bf16((const uint16_t*)r + 32 * b + 16); }
      if (KIND == Q8_0) { const uint8_t* k = r + 34 * b; d = half(k); w0 = widen_i8(k + 2); w1 = widen_i8(k + 18); }
      if (KIND == Q4_0 || KIND == Q4_1) {
        const uint8_t* k = r + (KIND == Q4_0 ? 18 : 20) * b;
        d = half(k);
        zero = KIND == Q4_0 ? -8.f * d : half(k + 2);
        vub q; std::memcpy(&q, k + (KIND == Q4_0 ? 2 : 4), 16);
        w0 = widen_u8(q & 15); w1 = widen_u8(q >> 4);
      }
      for (int m = 0; m < M; m++) {
        const float* xp = x + m * K + 32 * b;
        vf p = w0 * loadf(xp) + w1 * loadf(xp + 16);
        if (KIND == F32 || KIND == BF16) acc[m] += p; else acc[m] += p * d;
        if (KIND == Q4_0 || KIND == Q4_1) off[m] += zero * xs[m * nb + b];
      }
    }
    for (int m = 0; m < M; m++) y[m * N + n] = sum16(acc[m]) + off[m];
  }
}

template <int KIND>
static void run(const float* x, const float* xs, const uint8_t* w, int64_t rb, float* y, int64_t M, int64_t K,
                int64_t N, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: rows<1, KIND>(x, xs, w, rb, y, K, N, n0, n1); break;  case 2: rows<2, KIND>(x, xs, w, rb, y, K, N, n0, n1); break;
    case 3: rows<3, KIND>(x, xs, w, rb, y, K, N, n0, n1); break;  case 4: rows<4, KIND>(x, xs, w, rb, y, K, N, n0, n1); break;
    case 5: rows<5, KIND>(x, xs, w, rb, y, K, N, n0, n1); break;  case 6: rows<6, KIND>(x, xs, w, rb, y, K, N, n0, n1); break;
    case 7: rows<7, KIND>(x, xs, w, rb, y, K, N, n0, n1); break;  default: rows<8, KIND>(x, xs, w, rb, y, K, N, n0, n1);
  }
}

// x (M, K) fp32 with M <= 8 and K % 32 == 0; w (N, row_bytes) uint8 (the raw rows) -> (M, N) fp32
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor w, int64_t kind, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), rb = w.numel() * w.element_size() / N;  // bytes per row
  TORCH_CHECK(M >= 1 && M <= 8 && K % 32 == 0 && x.is_contiguous() && w.is_contiguous(), "linear_rows: bad shapes");
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  std::vector<float> sums(M * (K / 32), 0.f);  // per-block sums of the activations, for zero points
  if (kind == Q4_0 || kind == Q4_1)
    for (int64_t i = 0; i < M * K; i++) sums[i / 32] += X[i];
  const float* XS = sums.data();
  const uint8_t* W = (const uint8_t*)w.data_ptr(); float* Y = y.data_ptr<float>();
  // at least 32 rows per task, so small matrices do not pay for waking the second thread
  at::parallel_for(0, N, 32, [&](int64_t n0, int64_t n1) {
    switch (kind) {
      case F32: run<F32>(X, XS, W, rb, Y, M, K, N, n0, n1); break;
      case BF16: run<BF16>(X, XS, W, rb, Y, M, K, N, n0, n1); break;
      case Q8_0: run<Q8_0>(X, XS, W, rb, Y, M, K, N, n0, n1); break;
      case Q4_0: run<Q4_0>(X, XS, W, rb, Y, M, K, N, n0, n1); break;
      default: run<Q4_1>(X, XS, W, rb, Y, M, K, N, n0, n1);
    }
  });
  return y;
}
"""

KINDS = {"f32": 0, "bf16": 1, "q8_0": 2, "q4_0": 3, "q4_1": 4}
_module = None  # the built extension, or False when it could not be built


def _build():
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load_inline

        from minillama.data.assets import cache_dir

        folder = cache_dir() / "kernels" / f"torch-{torch.__version__}"
        folder.mkdir(parents=True, exist_ok=True)
        fresh = not any(folder.glob("*.so"))
        if fresh:
            print(f"building the decode kernels with the C++ compiler (once, cached in {folder}) ...",
                  file=sys.stderr)
        try:
            _module = load_inline("minillama_kernels", cpp_sources=SOURCE, functions=["linear_rows"],
                                  build_directory=str(folder), extra_cflags=["-O3", "-march=native"])
        except (RuntimeError, OSError, ImportError) as e:  # no compiler, or it failed
            print(f"note: could not build the decode kernels ({str(e).splitlines()[0][:120]}); using torch's "
                  "slower paths. Install g++ for the fast ones.", file=sys.stderr)
            _module = False
    return _module


def available() -> bool:
    """Whether the kernels are built (building them now if they were not)."""
    return bool(_build())


def linear_rows(x: torch.Tensor, weight: torch.Tensor, kind: str, out_features: int) -> torch.Tensor:
    """x (M, K) fp32, M <= 8 -> x · Wᵀ (M, N), W held as `kind` (f32, bf16, q8_0, q4_0, q4_1) in the raw
    rows `weight` (N, row bytes or elements). A plain call into the extension: wrapping it as a
    torch.library custom op (for torch.compile) costs ~70 MB of imports on its first call."""
    return _build().linear_rows(x.contiguous(), weight, KINDS[kind], out_features)
