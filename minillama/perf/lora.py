"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a transform: `apply_lora(model, r, alpha, dropout, targets)`.

Each targeted nn.Linear W (out, in) of the decoder layers becomes W x + (alpha / r) · B A dropout(x): W frozen,
A (r, in) Kaiming-uniform and B (out, r) zero, so the model starts as exactly the base model and only A and B,
r·(in + out) numbers per matrix, learn. Module names follow peft (q_proj.base_layer, q_proj.lora_A,
q_proj.lora_B), so checkpoint/peft.py writes an adapter peft loads with no mapping beyond peft's prefix.
`merge_lora` folds (alpha / r) · B A into W for export: the same function, a plain model again.
"""

import math

import torch
from torch import nn

from minillama.config import LORA_TARGETS


class LoRALinear(nn.Module):
    """base_layer(x) + scaling · lora_B(lora_A(dropout(x))), in peft's order of operations."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, generator=None):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / r
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)  # (r, in)
        self.lora_B = nn.Linear(r, base.out_features, **kw)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout)
        with torch.no_grad():  # peft's default: A as nn.Linear initialises itself, B = 0
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            self.lora_B.weight.zero_()

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W + scaling · B A."""
        base = self.base_layer
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        linear.weight.copy_(base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)


def _targets_in(model, targets, layers) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every module named in `targets` inside the chosen decoder layers."""
    found = []
    for i, layer in enumerate(model.layers):
        if layers is not None and i not in layers:
            continue
        for parent in layer.modules():
            for name, child in parent.named_children():
                if name in targets:
                    found.append((parent, name, child))
    return found


def apply_lora(model, r: int, alpha: float, dropout: float = 0.0, targets=LORA_TARGETS, layers=None,
               seed: int | None = None):
    """model -> the same model with every weight frozen and LoRA on the `targets` linears of its decoder
    layers, or only of the layers whose indices are in `layers` (peft's layers_to_transform: adapting the
    top layers alone, the backward pass stops below them). A Llama or a LlamaForSequenceClassification (the
    caller unfreezes a new head). In place."""
    if r <= 0 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank > 0, alpha > 0 and dropout in [0, 1), got {r}, {alpha}, {dropout}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.requires_grad_(False)
    if layers is not None and not set(layers) <= set(range(len(model.layers))):
        raise ValueError(f"LoRA layers {sorted(layers)}: the model has layers 0 to {len(model.layers) - 1}")
    found = _targets_in(model, set(targets), layers)
    names = {name for _, name, _ in found}
    if set(targets) - names:
        raise ValueError(f"LoRA targets {sorted(set(targets) - names)} are not linear layers of the decoder; "
                         f"choose among {', '.join(LORA_TARGETS)}")
    for parent, name, child in found:
        if not isinstance(child, nn.Linear):
            raise ValueError(f"LoRA target {name} is a {type(child).__name__}, not an nn.Linear")
        setattr(parent, name, LoRALinear(child, r, alpha, dropout, generator))
    return model


def lora_modules(model) -> dict[str, LoRALinear]:
    """The LoRA layers of a model by name (empty for a model without LoRA)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model):
    """model -> the same model with every LoRA layer folded into a plain nn.Linear. In place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model
