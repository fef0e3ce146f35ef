"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864) and its length extensions.

Pair i of a head is rotated by the angle position · θᵢ with θᵢ = base^(-2i/D): attention scores then
depend on positions only through their difference. A model run past the length it was trained on sees
angles it never saw; the extensions change the frequencies (here) or the positions (ReRoPE, in
model/positions.py) so that it does not.

Each RopeScaling type (config.py) is one function: the plain frequencies in, the scaled ones and an
attention factor out (cos and sin are multiplied by the factor, so q·k by its square, as transformers
does). linear, dynamic, yarn, llama3 and longrope follow transformers' modeling_rope_utils.py, and the
tests compare them with it.
"""

import math

import torch

from minillama.config import ModelConfig, RopeScaling

# the frequencies of these depend on the current sequence length, so keys cannot be rotated once for all
LENGTH_DEPENDENT = ("dynamic", "longrope")
# and these rotate each query/key pair by its clipped distance (model/positions.py)
RELATIVE = ("rerope", "leaky_rerope")


def plain_frequencies(D: int, base: float):
    """θᵢ = base^(-2i/D) for the D/2 pairs, in float64."""
    return 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def rope_base(config: ModelConfig) -> float:
    """The rotary base actually used. NTK-aware scaling (bloc97, 2023, "NTK-Aware Scaled RoPE") raises it so
    the lowest frequency stretches by the factor while the highest barely moves: base · factor^(D/(D-2))."""
    s = config.rope_scaling
    if s is not None and s.type == "ntk":
        D = config.rope_dim
        return config.rope_theta * s.factor ** (D / (D - 2))
    return config.rope_theta


def frequencies(config: ModelConfig, length: int | None = None) -> tuple[torch.Tensor, float]:
    """θ (D/2,) float64 of the config's RoPE, and its attention factor. `length`: the sequence length, for
    the types that depend on it (LENGTH_DEPENDENT); None = the length the model was trained on."""
    s = config.rope_scaling
    theta = plain_frequencies(config.rope_dim, rope_base(config))
    if s is None or s.type in ("ntk", *RELATIVE):
        return theta, 1.0
    return SCALINGS[s.type](theta, s, config, length)


def _linear(theta, s: RopeScaling, config, length):
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595): positions / factor stay in the trained
    range; dividing the frequencies instead is the same rotation."""
    return theta / s.factor, 1.0


def _dynamic(theta, s: RopeScaling, config, length):
    """Dynamic NTK (emozilla, 2023): the NTK base, raised only as far as the current length needs."""
    D, trained = config.rope_dim, s.original(config)
    length = max(length or trained, trained)
    base = config.rope_theta * (s.factor * length / trained - (s.factor - 1)) ** (D / (D - 2))
    return plain_frequencies(D, base), 1.0


def _yarn(theta, s: RopeScaling, config, length):
    """YaRN (Peng et al. 2023, arXiv:2309.00071): pairs that turn many times within the trained length keep
    their frequency, pairs that turn less than once are interpolated, a linear ramp between; attention is
    sharpened by 0.1·ln(factor) + 1."""
    D, trained, factor = config.rope_dim, s.original(config), s.factor

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.attention_factor
    if attention is None:
        attention = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim) if s.mscale and s.mscale_all_dim \
            else mscale(factor)

    def pair_turning(turns):  # the (fractional) pair index that turns `turns` times in the trained length
        return D * math.log(trained / (turns * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = pair_turning(s.beta_fast or 32), pair_turning(s.beta_slow or 1)
    if s.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    high = high + 0.001 if low == high else high  # no division by zero
    ramp = ((torch.arange(D // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0 = keep, 1 = interpolate
    return theta * (1 - ramp) + theta / factor * ramp, attention


def _llama3(theta, s: RopeScaling, config, length):
    """Llama 3.1: wavelengths longer than trained / low_freq_factor are interpolated by the factor, shorter
    than trained / high_freq_factor kept, and those between mixed by where they fall."""
    trained = s.original(config)
    wavelength = 2 * math.pi / theta
    smooth = ((trained / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * theta / s.factor + smooth * theta, 1.0


def _longrope(theta, s: RopeScaling, config, length):
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753; Phi-3): searched per-pair divisors, one set for
    sequences up to the trained length and one for longer ones."""
    trained = s.original(config)
    attention = s.attention_factor
    if attention is None:
        attention = 1.0 if s.factor <= 1 else math.sqrt(1 + math.log(s.factor) / math.log(trained))
    divisors = s.long_factor if length is not None and length > trained else s.short_factor
    return theta / torch.tensor(divisors, dtype=torch.float64), attention


def _truncation(theta, s: RopeScaling, config, length):
    """The notes' base truncation (Pal et al. 2023, "Giraffe", arXiv:2308.10882): keep θ >= high, set
    low <= θ < high to the fixed beta, and θ < low to 0 (those pairs stop encoding position at all)."""
    kept = torch.where(theta >= s.high, theta, torch.full_like(theta, s.beta))
    return torch.where(theta >= s.low, kept, torch.zeros_like(theta)), 1.0


SCALINGS = {"linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3, "longrope": _longrope,
            "truncation": _truncation}


def fixed_rotation(config: ModelConfig) -> bool:
    """True when each token's rotation is fixed once and for all, so keys can be cached rotated and read
    from the tables: plain RoPE and every frequency rule that does not depend on the length."""
    s = config.rope_scaling
    return config.position_encoding == "rope" and (s is None or s.type not in LENGTH_DEPENDENT + RELATIVE)


def rope_tables(config: ModelConfig, length: int, device=None):
    """cos and sin of every position's rotation angles, (length, D) each, precomputed once in float32 (the
    attention factor included)."""
    theta, scale = frequencies(config)
    positions = torch.arange(length, dtype=torch.float64)
    cos, sin = rotation(theta, positions, scale)
    return cos.to(device), sin.to(device)


def rotation(theta, positions, scale: float = 1.0):
    """cos and sin (..., S, D) float32 of rotating by positions · θ. positions (..., S) may be fractional;
    theta (D/2,) for all, or (..., D/2) with the same leading dims, a set of frequencies per row."""
    theta = theta.to(positions.device)
    if theta.dim() > 1:
        theta = theta.unsqueeze(-2)  # (..., 1, D/2)
    angles = positions.double()[..., None] * theta  # (..., S, D/2)
    # rotate-half layout (HF): pair i is (x[i], x[i + D/2]), so each angle is repeated once per half
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + D/2]) pair by its angle: x·cos + rotate_half(x)·sin, element-wise.

    x (B, heads, T, D); cos/sin (B, 1, T, D) gathered at each token's position.
    """
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
