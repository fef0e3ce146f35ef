"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864) and its length extensions.

Pair i of a head is rotated by the angle position · θᵢ with θᵢ = base^(-2i/D): attention scores then
depend on positions only through their difference. A model run past the length it was trained on sees
angles it never saw; the extensions change the positions or the frequencies so that it does not.
"""

import torch

from minillama.config import ModelConfig


def rope_base(config: ModelConfig) -> float:
    """The rotary base actually used. NTK-aware scaling (bloc97, 2023, "NTK-Aware Scaled RoPE") raises it so
    the lowest frequency stretches by the factor while the highest barely moves: base · factor^(D/(D-2))."""
    if config.rope_scaling == "ntk":
        D = config.rope_dim
        return config.rope_theta * config.rope_factor ** (D / (D - 2))
    return config.rope_theta


def rope_tables(config: ModelConfig, length: int, device=None):
    """cos and sin of every position's rotation angles, (length, D) each, precomputed once in float32.

    linear = position interpolation (Chen et al. 2023, arXiv:2306.15595): squeeze positions by the factor
    so they stay in the trained range; ntk = raise the base instead (rope_base).
    """
    D = config.rope_dim  # the head, or the rotary part of a latent-attention head
    inv_freq = 1.0 / rope_base(config) ** (torch.arange(0, D, 2, device=device, dtype=torch.float64) / D)  # (D/2,)
    positions = torch.arange(length, device=device, dtype=torch.float64)
    if config.rope_scaling == "linear":
        positions = positions / config.rope_factor
    angles = torch.outer(positions, inv_freq)  # (length, D/2)
    # rotate-half layout (HF): pair i is (x[i], x[i + D/2]), so each angle is repeated once per half
    angles = torch.cat([angles, angles], dim=-1)  # (length, D)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + D/2]) pair by its angle: x·cos + rotate_half(x)·sin, element-wise.

    x (B, heads, T, D); cos/sin (B, 1, T, D) gathered at each token's position.
    """
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
