"""The default fast path: matmul modules that keep weights as they are stored, and `make_fast`, the
transform every command applies after loading (unless --plain).

Decoding reads every weight once per token, so its speed is the bytes of the weights / memory bandwidth:
weights should be read in the smallest form they come in, and never copied to a wider one.
  FastLinear    fp32 or bf16 weights (bf16 = half the bytes; fp32 activations, as llama.cpp does)
  GGMLLinear    GGUF Q8_0 / Q4_0 / Q4_1 blocks straight from the file (1.06 / 0.56 / 0.63 bytes a weight)
  GGMLEmbedding the token embedding as GGUF blocks: a lookup dequantizes only the rows it reads
Up to kernels.MAX_ROWS rows of activations (decoding) they call the C++ kernels (kernels.py); more rows
(prefill, evaluation) are a compute-bound GEMM, done by torch on weights dequantized for that call (bf16
for Q4, whose weights are 4-bit anyway; fp32 for Q8_0, so that it stays equal to its fp32 reference).
Activations, norms and the KV cache stay fp32. Each module's `weight` is its matrix dequantized to
(out, in), for code that inspects it; it costs a full conversion.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minillama.perf import kernels

BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # bytes per block of 32 weights
PREFILL_DTYPE = {"q8_0": torch.float32, "q4_0": torch.bfloat16, "q4_1": torch.bfloat16}


def dequantize(blocks, kind: str, dtype=torch.float32):
    """GGUF blocks (N, K/32 · bytes) uint8 -> weights (N, K) in `dtype`; the formulas of kernels.py."""
    N = blocks.shape[0]
    b = blocks.reshape(N, -1, BLOCK_BYTES[kind])  # (N, K/32, bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (N, K/32, 1)
    if kind == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()  # (N, K/32, 32)
        w = q * d
    else:
        nibbles = b[..., 2:] if kind == "q4_0" else b[..., 4:]  # (N, K/32, 16)
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float()  # (N, K/32, 32): low nibbles first
        w = (q - 8) * d if kind == "q4_0" else q * d + b[..., 2:4].contiguous().view(torch.float16).float()
    return w.reshape(N, -1).to(dtype)  # (N, K)


def quantize(weight, kind: str):
    """Weights (N, K) -> GGUF blocks of `kind`, with the gguf package's reference quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    blocks = gguf_quantize(weight.detach().float().numpy(), GGMLQuantizationType[kind.upper()])
    return torch.from_numpy(blocks)  # (N, K/32 · bytes) uint8


class GGMLLinear(nn.Module):
    """y = x · Wᵀ (+ bias) with W (N, K) kept as GGUF blocks (N, K/32 · bytes) of `kind`."""

    def __init__(self, blocks, kind: str, in_features: int, bias=None):
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self.bias = bias

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] <= kernels.MAX_ROWS and kernels.available():
            y = kernels.linear_rows(x2.float(), self.blocks, self.kind, self.out_features)  # (M, N)
        else:
            dtype = PREFILL_DTYPE[self.kind]
            y = F.linear(x2.to(dtype), dequantize(self.blocks, self.kind, dtype))
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self):
        return dequantize(self.blocks, self.kind)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} blocks"


class GGMLEmbedding(nn.Module):
    """The token embedding as GGUF blocks (V, C/32 · bytes); a tied LM head shares the same tensor."""

    def __init__(self, blocks, kind: str, dim: int):
        super().__init__()
        self.kind, self.dim = kind, dim
        self.register_buffer("blocks", blocks)

    def forward(self, ids):
        rows = self.blocks[ids.reshape(-1)]  # (B·T, C/32 · bytes): only the rows looked up
        return dequantize(rows, self.kind).view(*ids.shape, self.dim)  # (B, T, C)

    @property
    def weight(self):
        return dequantize(self.blocks, self.kind)


class FastLinear(nn.Linear):
    """nn.Linear over fp32 or bf16 weights whose few-row calls go to the bandwidth-bound kernel; more rows
    to torch's GEMM in the weights' dtype; the output has the activations' dtype."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FastLinear":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.in_features, fast.out_features = linear.in_features, linear.out_features
        fast.weight, fast.bias = linear.weight, linear.bias  # the same Parameters: tying survives
        return fast

    def forward(self, x):
        w = self.weight
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(w.dtype)
        usable = kind and x2.shape[0] <= kernels.MAX_ROWS and self.in_features % 32 == 0 and w.is_contiguous()
        if usable and x.device.type == "cpu" and kernels.available():
            y = kernels.linear_rows(x2.float(), w.detach(), kind, self.out_features).to(x.dtype)
        else:
            y = F.linear(x2.to(w.dtype), w).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def make_fast(model: nn.Module) -> nn.Module:
    """Every plain nn.Linear becomes a FastLinear over the same weights (fp32 or bf16); GGUF blocks are
    already fast. Builds the kernels now, not in the middle of the first answer."""
    kernels.available()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                setattr(module, name, FastLinear.from_linear(child))
    return model


def to_bf16_weights(model: nn.Module) -> nn.Module:
    """Matmul weights (and a tied embedding) in bf16, half the bytes to read; norms, activations and the
    KV cache stay fp32, and FastLinear widens the weights in registers."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data = module.weight.data.to(torch.bfloat16)  # .data: a tied head follows
    return model


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Every nn.Linear as GGUF blocks of `kind` (q8_0, q4_0, q4_1), quantized here: `--quantize`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % 32 == 0:
                setattr(module, name, GGMLLinear(quantize(child.weight, kind), kind, child.in_features, child.bias))
    return model
