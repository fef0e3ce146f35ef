"""ModelConfig: the shape of a Llama-family model, its named presets, and Hugging Face config.json."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave us (a path, a field, a value): printed as one line, no traceback."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096  # C: width of the residual stream (HF: hidden_size)
    n_layers: int = 32
    n_heads: int = 32  # H: query heads
    n_kv_heads: int | None = None  # K: key/value heads; None = n_heads (MHA), 1 = MQA, else GQA
    hidden_dim: int | None = None  # SwiGLU width; None = Llama 2's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Length extension (seed 000/002): "linear" = position interpolation (positions / factor),
    # "ntk" = NTK-aware scaling (raise the base, not the positions).
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds a bias to q/k/v (not to o)
    sliding_window: int | None = None  # Mistral / Qwen2: each token sees at most this many keys
    model_type: str = "llama"  # llama | mistral | qwen2: the HF family written to config.json
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise UserError(f"config field dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"config field n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: "
                "each key/value head must serve a whole group of query heads")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embedding")
        if self.rope_scaling not in (None, "linear", "ntk"):
            raise UserError(f"config field rope_scaling={self.rope_scaling!r}: use linear, ntk or none")
        if self.model_type not in FAMILIES:
            raise UserError(f"config field model_type={self.model_type!r}: use one of {', '.join(FAMILIES)}")

    @property
    def head_dim(self) -> int:  # D
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width. Llama 2: 2/3 of 4·dim (so 3 matrices cost what 2 did), then rounded up."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def rope_base(self) -> float:
        """The rotary base actually used. NTK-aware scaling (seed 002) raises it so that the lowest
        frequency stretches by the factor while the highest barely moves: base · factor^(D/(D-2))."""
        if self.rope_scaling == "ntk":
            return self.rope_theta * self.rope_factor ** (self.head_dim / (self.head_dim - 2))
        return self.rope_theta

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----

    def to_hf(self) -> dict:
        arch = FAMILIES[self.model_type]
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,  # HF has no static NTK type: it is just this larger base
            "rope_scaling": self._hf_rope_scaling(),
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            if self.qkv_bias:
                raise UserError("a llama config.json cannot express a q/k/v-only bias; use model_type qwen2")
            d |= {"attention_bias": False, "mlp_bias": False}
        elif self.model_type == "qwen2":
            if not self.qkv_bias:
                raise UserError("Qwen2 always has q/k/v biases; set qkv_bias=True or use model_type llama")
            d |= {"use_sliding_window": self.sliding_window is not None,
                  "sliding_window": self.sliding_window, "max_window_layers": 0}
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d

    def _hf_rope_scaling(self):
        if self.rope_scaling == "linear":
            return {"rope_type": "linear", "factor": self.rope_factor}
        return None

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in FAMILIES:
            raise UserError(f"{source}: model_type {model_type!r} is not supported; use one of {', '.join(FAMILIES)}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise UserError(f"{source}: missing field {key!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Llama uses silu)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise UserError(f"{source}: attention_bias/mlp_bias on a llama model is not supported")
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim * n_heads != d["hidden_size"]:
            raise UserError(f"{source}: head_dim {head_dim} x {n_heads} heads != hidden_size {d['hidden_size']}")
        rope = d.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        kind, factor = None, 1.0
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("linear",):
                raise UserError(f"{source}: rope_scaling type {kind!r} is not supported (use linear)")
            factor = float(scaling["factor"])
        window = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        return cls(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads, hidden_dim=d.get("intermediate_size"),
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=kind, rope_factor=factor,
            max_seq_len=d.get("max_position_embeddings", 2048),
            tie_embeddings=d.get("tie_word_embeddings", model_type == "qwen2"),
            qkv_bias=model_type == "qwen2", sliding_window=window, model_type=model_type,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json (Hugging Face keys) or our own field names from a JSON file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise UserError(f"{path}: no such config file")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if "hidden_size" in d:
            return cls.from_hf(d, str(path))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"{path}: unknown config fields {sorted(unknown)}")
        return cls(**d)

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_hf(), indent=2) + "\n")


FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama2.c's TinyStories models tie the classifier to the embedding and use Llama 2's 32k vocabulary
_STORIES = dict(vocab_size=32000, tie_embeddings=True, multiple_of=32)

PRESETS = {
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              multiple_of=4096, ffn_dim_multiplier=1.3),
    "stories260K": ModelConfig(vocab_size=512, dim=64, n_layers=5, n_heads=8, n_kv_heads=4, multiple_of=4,
                               max_seq_len=512, tie_embeddings=True),
    "stories15M": ModelConfig(dim=288, n_layers=6, n_heads=6, max_seq_len=256, **_STORIES),
    "stories42M": ModelConfig(dim=512, n_layers=8, n_heads=8, max_seq_len=1024, **_STORIES),
    "stories110M": ModelConfig(dim=768, n_layers=12, n_heads=12, max_seq_len=1024, **_STORIES),
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                                rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                                bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "qwen2-0.5b": ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                              norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True,
                              qkv_bias=True, model_type="qwen2", bos_token_id=151643, eos_token_id=151643),
    "tiny": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                        max_seq_len=128),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
