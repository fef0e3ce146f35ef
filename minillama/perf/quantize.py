"""Fewer bytes per weight: bf16 weights, and int8 weight-only quantization for decoding.

Decoding one token reads every weight once and does two flops per weight, so on a CPU it is bound by
memory bandwidth: halving the bytes (bf16) or quartering them (int8) is what speeds it up. Both are
transforms, model -> model, applied after loading; the model code stays pure fp32 math.
"""

import torch
import torch.nn.functional as F
from torch import nn

MAX_KERNEL_ROWS = 16  # activation rows up to which the int8 kernel beats dequantize + bf16 GEMM


def apply_bf16(model: nn.Module) -> nn.Module:
    """Weights (and so the KV cache and activations) in bfloat16; what needs fp32 keeps it.

    RMSNorm squares and averages in fp32 (model.py casts up itself), attention's softmax runs in fp32
    inside SDPA and reference_attention, and the rotary tables stay fp32 (a bf16 cos/sin would be off by
    up to 2⁻⁹ in every entry): apply_rope then promotes the bf16 activations to fp32 for the rotation
    and casts back.
    """
    model.to(torch.bfloat16)
    model.model.init_rope(model.model.embed_tokens.weight.device)  # fp32 cos/sin again (.to() cast them)
    return model


class Int8Linear(nn.Module):
    """y = x · (q · s)ᵀ with q int8 (O, I) and one scale per output row s (O,): symmetric, per channel.

    The matmul is torch's CPU kernel `aten::_weight_int8pack_mm(x (M, I) bf16, q (O, I) int8, s (O,) bf16)`,
    which reads the int8 weights and multiplies by the scale after accumulating. It is fast with bf16
    activations only (with fp32 ones it runs ~10x slower here), so x goes in as bf16 and comes back in
    its own dtype; the rounding to bf16 is one of the ≤2% perplexity cost this transform is tested for.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (O, I)
        # the scale is rounded to bf16 *before* quantizing, so q · s is the weight we meant, not q · s'
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)  # (O,)
        q = torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8)  # (O, I)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.dtype = linear.weight.dtype  # of the activations around it

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, I)
        if x2.shape[0] <= MAX_KERNEL_ROWS:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)  # (M, O)
        else:
            # prefill is compute-bound, and the int8 kernel is slower there than a bf16 GEMM (oneDNN, ~3x
            # faster than fp32 on AVX512-BF16): dequantize once per call, amortized over M rows
            y = F.linear(x2, self.qweight.to(torch.bfloat16) * self.scale[:, None])
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., O)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self):
        """The weight this layer multiplies by, dequantized to (O, I) in the model's dtype: for code that
        inspects `.weight` (its shape, dtype, device) and for tests. It costs a full dequantization; the
        forward never uses it."""
        return (self.qweight.float() * self.scale.float()[:, None]).to(self.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def apply_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every nn.Linear (names not in `skip`) for an Int8Linear; activations keep their dtype.

    A tied LM head gets its own int8 copy: the embedding only looks up one row per token, so it stays
    in full precision and costs no bandwidth.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, Int8Linear(child))
    return model

