"""Fast fp32 decoding: a matrix-vector kernel that reads the weights at the machine's memory bandwidth.

Decoding reads every weight once per step for 1..8 rows of activations, so its speed is bytes / bandwidth.
On our CPUs (AMD EPYC, 2 cores) torch's fp32 `F.linear` for one row goes to MKL's single-threaded
gemv and streams weights at ~14 GB/s, a quarter of what two threads can read (~50 GB/s by `sum`).
The kernel below is the obvious loop, what llama2.c's `matmul` does: each output row is a dot product
of one weight row with the activations, rows split between threads by `at::parallel_for`, 16 floats
per SIMD step (a GCC vector type, so it compiles to AVX-512 or AVX2 as the CPU has). With M ≤ 8 rows
of activations each weight vector is loaded once and used M times. Measured on one thread for the
stories110M matrices: 24 GB/s at M = 1 (F.linear: 14), but M = 8 takes ~4x as long as M = 1: the gain
is batch-1 decoding. Over all of stories110M's matrices (2 threads): M = 1, 4, 7 take 20, 36, 76 ms with
the kernel against 34, 58, 103 ms with F.linear, while at M = 8 MKL switches to a faster path (54 ms
against the kernel's 84), so from 8 rows on (batched decode, prefill) torch's GEMM does the work.

`apply_fast_linear(model)` swaps every nn.Linear for a FastLinear that shares its weight (a tied LM
head stays tied); the kernel is compiled once (~30 s, needs a C++ compiler) into the cache folder.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minillama.config import UserError

MAX_ROWS = 7  # activation rows up to which the kernel beats torch's GEMM (measured above)

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

typedef float vec __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register (two AVX2 ones)

// the 16 lanes added as a tree (8 + 8, 4 + 4, ...): 4 dependent adds instead of a chain of 16
static inline float sum16(vec v) {
  float s[16];
  std::memcpy(s, &v, sizeof(vec));
  for (int width = 8; width > 0; width /= 2)
    for (int k = 0; k < width; k++) s[k] += s[k + width];
  return s[0];
}

// y[m, o] = sum_i x[m, i] * w[o, i] for rows o in [begin, end); I is a multiple of 16.
template <int M>
void dot_rows(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; o++) {
    const float* row = w + o * I;
    vec acc[M] = {};
    for (int64_t i = 0; i < I; i += 16) {
      vec wv, xv;
      std::memcpy(&wv, row + i, sizeof(vec));  // unaligned load; each weight is read once, here
      for (int m = 0; m < M; m++) {
        std::memcpy(&xv, x + m * I + i, sizeof(vec));  // activations stay in L1
        acc[m] += wv * xv;  // fused multiply-add
      }
    }
    for (int m = 0; m < M; m++) y[m * O + o] = sum16(acc[m]);
  }
}

template <int M>
void run(const float* x, const float* w, float* y, int64_t I, int64_t O) {
  // grain: at least 64 rows per task, so tiny matrices do not pay for waking the second thread
  at::parallel_for(0, O, 64, [&](int64_t begin, int64_t end) { dot_rows<M>(x, w, y, I, O, begin, end); });
}

// x (M, I) with M <= 8, w (O, I), both fp32 contiguous -> y (M, O)
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor w) {
  const int64_t M = x.size(0), I = x.size(1), O = w.size(0);
  auto y = torch::empty({M, O}, x.options());
  const float* X = x.data_ptr<float>(); const float* W = w.data_ptr<float>(); float* Y = y.data_ptr<float>();
  switch (M) {
    case 1: run<1>(X, W, Y, I, O); break;  case 2: run<2>(X, W, Y, I, O); break;
    case 3: run<3>(X, W, Y, I, O); break;  case 4: run<4>(X, W, Y, I, O); break;
    case 5: run<5>(X, W, Y, I, O); break;  case 6: run<6>(X, W, Y, I, O); break;
    case 7: run<7>(X, W, Y, I, O); break;  case 8: run<8>(X, W, Y, I, O); break;
    default: TORCH_CHECK(false, "linear_rows: at most 8 rows, got ", M);
  }
  return y;
}
"""

_kernel = None


def kernel():
    """The compiled extension module, built on first use and cached in the minillama cache folder."""
    global _kernel
    if _kernel is None:
        from torch.utils.cpp_extension import load_inline

        from minillama.data.assets import cache_dir

        build = cache_dir() / "kernels" / "gemv"
        build.mkdir(parents=True, exist_ok=True)
        try:
            _kernel = load_inline("minillama_gemv", cpp_sources=KERNEL, functions=["linear_rows"], build_directory=str(build),
                                  extra_cflags=["-O3", "-march=native", "-ffp-contract=fast"])
        except (RuntimeError, OSError) as e:  # no compiler, or it failed
            raise UserError(f"could not build the fp32 decode kernel in {build} ({str(e).splitlines()[0]}): "
                            "install a C++ compiler (g++) or leave out apply_fast_linear") from None
    return _kernel


@torch.library.custom_op("minillama::linear_rows", mutates_args=())
def linear_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, I), M <= 8, weight (O, I) -> (M, O): x · weightᵀ by the kernel. A custom op, so
    torch.compile calls it as one opaque node instead of tracing into the extension."""
    return kernel().linear_rows(x.contiguous(), weight)


@linear_rows.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


class FastLinear(nn.Linear):
    """nn.Linear whose few-row fp32 calls go to the bandwidth-bound kernel; everything else to F.linear."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FastLinear":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.in_features, fast.out_features = linear.in_features, linear.out_features
        fast.weight, fast.bias = linear.weight, linear.bias  # the same Parameters: tying survives
        return fast

    def forward(self, x):
        rows = x.numel() // self.in_features
        usable = (rows <= MAX_ROWS and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                  and self.in_features % 16 == 0 and self.weight.is_contiguous() and x.device.type == "cpu")
        if not usable:
            return F.linear(x, self.weight, self.bias)
        y = linear_rows(x.reshape(rows, self.in_features), self.weight)  # (M, O)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def apply_fast_linear(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear for a FastLinear over the same weights; builds the kernel now, not mid-decode."""
    kernel()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, FastLinear.from_linear(child))
    return model
