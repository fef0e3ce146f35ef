"""Every configuration in one place: the model's shape (ModelConfig and named presets) and the run-time
configs of the stages (TrainConfig, GenerationConfig). Each field states its default and its help once;
the command line is generated from them (cli.add_fields). Hugging Face's config.json is translated in
checkpoint/hf.py. Nothing here imports torch, so `minillama --help` is instant.
"""

import dataclasses
import math
import re
from dataclasses import dataclass, field


class UserError(Exception):
    """A mistake in what the user gave us (a path, a field, a value): printed as one line, no traceback."""

    def naming(self, source) -> "UserError":
        """This error with the file it is about in front, unless the message names it already."""
        return self if str(source) in str(self) else UserError(f"{source}: {self}")


def option(default, help: str, **cli):
    """A config field with its command-line help (and extra argparse settings, e.g. choices)."""
    kind = "default_factory" if isinstance(default, list) else "default"
    return field(**{kind: (lambda: list(default)) if kind == "default_factory" else default},
                 metadata={"help": help, **cli})


# ---- the model ----

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
    rope_scaling: "RopeScaling | None" = None  # running past the trained length (see RopeScaling)
    # rope, or alibi: no rotation, a bias on the scores linear in the distance (Press et al. 2021, arXiv:2108.12409)
    position_encoding: str = "rope"
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds a bias to q/k/v (not to o)
    sliding_window: int | None = None  # Mistral / Qwen2: each token sees at most this many keys
    model_type: str = "llama"  # a key of FAMILIES: the HF family written to config.json
    # Mixture of experts (model/moe.py; Mixtral, Qwen2-MoE, DeepSeek-V2): n_experts 0 = a dense MLP everywhere
    n_experts: int = 0  # E: expert MLPs per MoE layer
    experts_per_token: int = 2  # k: the router sends each token to its k most probable experts
    expert_dim: int | None = None  # each expert's SwiGLU width; None = ffn_dim (Mixtral)
    norm_topk_prob: bool = True  # rescale the k chosen probabilities to sum to 1 (Mixtral); Qwen2-MoE: False
    routed_scale: float = 1.0  # DeepSeek's routed_scaling_factor: multiplies the experts' weights
    shared_expert_dim: int | None = None  # an expert every token goes through, this wide (Qwen2-MoE, DeepSeek)
    shared_expert_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(w · x)
    first_dense_layers: int = 0  # DeepSeek's first_k_dense_replace: the first layers keep a dense MLP
    # training only: the load-balancing loss's weight (0.01: Switch Transformer, arXiv:2101.03961, sec. 2.2)
    # and the router z-loss's (ST-MoE, arXiv:2202.08906, eq. 5; 0 = off)
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    # Multi-head latent attention (model/mla.py; DeepSeek-V2): kv_lora_rank None = standard attention
    kv_lora_rank: int | None = None  # R: the compressed key/value latent, what the cache keeps per token
    q_lora_rank: int | None = None  # queries through a low-rank bottleneck this wide; None = one q_proj
    qk_rope_head_dim: int = 64  # Dr: the rotary part of a query/key head (the key's is shared by all heads)
    qk_nope_head_dim: int = 128  # Dn: the part of a query/key head without position
    v_head_dim: int = 128  # Dv
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
        if isinstance(self.rope_scaling, dict):  # from JSON (our own field names, or asdict)
            object.__setattr__(self, "rope_scaling", RopeScaling.of(self.rope_scaling))
        if self.position_encoding not in ("rope", "alibi"):
            raise UserError(f"config field position_encoding={self.position_encoding!r}: use rope or alibi")
        if self.rope_scaling is not None:
            self.rope_scaling.check(self)
        if self.model_type not in FAMILIES:
            raise UserError(f"config field model_type={self.model_type!r}: use one of {', '.join(FAMILIES)}")
        self._check_experts_and_latents()

    def _check_experts_and_latents(self):
        if self.n_experts < 0 or self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise UserError(f"config fields n_experts={self.n_experts}, experts_per_token={self.experts_per_token}: "
                            "need 0 experts (dense), or 1 <= experts_per_token <= n_experts")
        if not 0 <= self.first_dense_layers <= self.n_layers:
            raise UserError(f"config field first_dense_layers={self.first_dense_layers} must be in 0..n_layers")
        if self.kv_lora_rank is None:
            return
        for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2 or self.n_kv_heads != self.n_heads or self.sliding_window is not None:
            raise UserError("latent attention (kv_lora_rank) needs an even qk_rope_head_dim, n_kv_heads = n_heads "
                            "(its keys come from one shared latent) and no sliding_window")
        s = self.rope_scaling.type if self.rope_scaling else None
        if self.position_encoding != "rope" or s not in (None, "linear", "ntk", "llama3", "truncation"):
            raise UserError("latent attention (kv_lora_rank) caches rotated rope keys: plain, linear, ntk, llama3 or "
                            f"truncation RoPE only, not {self.position_encoding} / {s} (no DeepSeek YaRN)")

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
    def rope_dim(self) -> int:
        """Dimensions of a head that rotate: all of it, or MLA's rotary part."""
        return self.head_dim if self.kv_lora_rank is None else self.qk_rope_head_dim

    @property
    def moe_dim(self) -> int:
        """An expert's SwiGLU width."""
        return self.expert_dim or self.ffn_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.first_dense_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "truncation", "rerope", "leaky_rerope")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE runs past the length the model was trained on; model/rope.py has one function per type.

    linear (position interpolation), ntk (a larger base), dynamic (the base grows with the sequence), yarn,
    llama3 and longrope read as Hugging Face's `rope_scaling` does (the same fields, None = its default);
    truncation is the notes' rule on frequencies; rerope and leaky_rerope clip relative positions.
    """
    type: str  # one of ROPE_TYPES
    factor: float = 1.0  # how many times the trained length to reach; leaky_rerope: k (slope 1/k past the window)
    original_max_seq_len: int | None = None  # the trained length (dynamic, yarn, llama3, longrope); None = max_seq_len
    attention_factor: float | None = None  # yarn, longrope: cos and sin are scaled by it; None = from the factor
    beta_fast: float | None = None  # yarn: pairs turning more than beta_fast (32) times in the trained length keep
    beta_slow: float | None = None  # their frequency, fewer than beta_slow (1) are interpolated, a ramp between
    mscale: float | None = None  # yarn (DeepSeek): the attention factor as a ratio of two of these
    mscale_all_dim: float | None = None
    truncate: bool | None = None  # yarn: round the ramp's ends to whole pairs (None = yes)
    low_freq_factor: float | None = None  # llama3: wavelengths past original / low_freq_factor are interpolated,
    high_freq_factor: float | None = None  # those below original / high_freq_factor kept, a ramp between
    short_factor: tuple[float, ...] | None = None  # longrope: per-pair divisors of the frequencies, up to and
    long_factor: tuple[float, ...] | None = None  # past the trained length (D/2 numbers each)
    low: float | None = None  # truncation: frequencies θ < low become 0, low <= θ < high become beta, θ >= high
    high: float | None = None  # stay (Pal et al. 2023, "Giraffe", arXiv:2308.10882)
    beta: float | None = None
    window: int | None = None  # rerope, leaky_rerope: relative positions up to it are used as they are

    @classmethod
    def of(cls, d: dict) -> "RopeScaling":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"config field rope_scaling: unknown fields {sorted(unknown)}")
        lists = {k: tuple(d[k]) for k in ("short_factor", "long_factor") if d.get(k) is not None}
        return cls(**d | lists)

    def check(self, config: "ModelConfig") -> None:
        """Raise UserError naming the first field this type needs and lacks, or has wrong."""
        if self.type not in ROPE_TYPES:
            raise UserError(f"config field rope_scaling.type={self.type!r}: use one of {', '.join(ROPE_TYPES)}")
        if config.position_encoding != "rope":
            raise UserError(f"rope_scaling {self.type} needs position_encoding rope, not {config.position_encoding}")
        needs = {"llama3": ("low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor"),
                 "truncation": ("low", "high", "beta"), "rerope": ("window",), "leaky_rerope": ("window",)}
        for name in needs.get(self.type, ()):
            if getattr(self, name) is None:
                raise UserError(f"rope_scaling {self.type} needs the field {name}")
        if not self.factor >= 1:
            raise UserError(f"rope_scaling.factor must be >= 1, got {self.factor!r}")
        if self.window is not None and not 0 < self.window:
            raise UserError(f"rope_scaling.window must be a positive number of tokens, got {self.window!r}")
        for name in ("short_factor", "long_factor"):
            if getattr(self, name) is not None and len(getattr(self, name)) != config.rope_dim // 2:
                raise UserError(f"rope_scaling.{name} needs {config.rope_dim // 2} numbers, one per rotary pair")

    def original(self, config: "ModelConfig") -> int:
        """The length the model was trained on."""
        return self.original_max_seq_len or config.max_seq_len


FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "deepseek_v2": "DeepseekV2ForCausalLM"}

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
    # mixtures of experts (model/moe.py), from the models' config.json files
    "mixtral-8x7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, n_experts=8,
                                rope_theta=1e6, max_seq_len=32768, model_type="mixtral", router_aux_loss_coef=0.02),
    "qwen2-moe-a2.7b": ModelConfig(vocab_size=151936, dim=2048, n_layers=24, n_heads=16, hidden_dim=5632,
                                   n_experts=60, experts_per_token=4, expert_dim=1408, norm_topk_prob=False,
                                   shared_expert_dim=5632, shared_expert_gate=True, norm_eps=1e-6, rope_theta=1e6,
                                   max_seq_len=8192, qkv_bias=True, model_type="qwen2_moe", router_aux_loss_coef=0.001,
                                   bos_token_id=151643, eos_token_id=151643),
    # latent attention and 64 experts; its YaRN context extension (x40 past 4,096) is not modelled here
    "deepseek-v2-lite": ModelConfig(vocab_size=102400, dim=2048, n_layers=27, n_heads=16, hidden_dim=10944,
                                    n_experts=64, experts_per_token=6, expert_dim=1408, norm_topk_prob=False,
                                    shared_expert_dim=2 * 1408, first_dense_layers=1, kv_lora_rank=512,
                                    norm_eps=1e-6, max_seq_len=4096, model_type="deepseek_v2",
                                    router_aux_loss_coef=0.001, bos_token_id=100000, eos_token_id=100001),
    "tiny-moe": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                            n_experts=4, max_seq_len=128, model_type="mixtral"),
    "tiny-mla": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128, kv_lora_rank=32,
                            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_seq_len=128,
                            model_type="deepseek_v2"),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---- training ----

@dataclass
class TrainConfig:
    """Everything `minillama train` takes; defaults follow llama2.c."""
    corpus: list[str] = option([], "built-in, text file, folder or .jsonl", nargs="+", required=True)
    out: str = option("", "run folder: tokenizer, data, checkpoints, log.jsonl, loss.png", required=True)
    preset: str | None = option(None, "model shape by name (tiny, stories15M, ...)")
    config: str | None = option(None, "model shape from a config JSON (HF config.json or our fields)")
    vocab_size: int | None = option(None, "train a SentencePiece BPE tokenizer of this size into RUN/tokenizer")
    tokenizer: str | None = option(None, "use this tokenizer (folder, .model, tokenizer.json, .gguf)")
    seq_len: int = option(256, "T: tokens per training window (the model's max_seq_len)")
    batch_size: int = option(32, "B: windows per optimizer step, over all processes")
    micro_batch_size: int | None = option(None, "windows per forward pass (accumulating gradients); "
                                                "default B / processes")
    max_steps: int | None = option(None, "optimizer steps")
    time_budget: str | None = option(None, "train this long (90s, 5m, 1h30m); the cosine is planned from the "
                                           "speed of the first steps")
    lr: float = option(5e-4, "peak learning rate")
    warmup_steps: int | None = option(None, "linear warmup steps; default 100, or a tenth of a run shorter than "
                                            "1,000 steps")
    min_lr: float | None = option(None, "learning rate at the end of the cosine; default lr / 10")
    weight_decay: float = option(0.1, "AdamW weight decay on matmul weights")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = option(100, "validation loss every N steps")
    eval_steps: int = option(10, "validation batches per evaluation")
    seed: int = option(1337, "weights and the order of training windows")
    save_every: int | None = option(None, "checkpoint every N steps; default at each evaluation")
    keep: int = option(2, "keep the last K step checkpoints (RUN/final is kept too)")
    resume: bool = option(False, "continue from the newest checkpoint in RUN")
    dtype: str = option("float32", "float32, or bfloat16 autocast (weights and optimizer stay float32)",
                        choices=["float32", "bfloat16"])
    compile: bool = option(False, "torch.compile each decoder layer")
    activation_checkpointing: bool = option(False, "recompute each layer's activations in backward")
    fsdp: bool = option(False, "shard weights, gradients and optimizer state across processes (FSDP2)")
    val_fraction: float = option(0.05, "documents held out for validation")
    data_dir: str | None = option(None, "token shard cache; default RUN/data")

    def check(self, world_size: int = 1) -> None:
        """Raise UserError naming the first bad field; called before any work starts."""
        if not self.out:
            raise UserError("no run folder: give --out RUN")
        self.check_source()
        if self.max_steps is None and self.time_budget is None:
            raise UserError("give --max-steps N or --time-budget DURATION")
        for name in ("seq_len", "batch_size", "micro_batch_size", "max_steps", "eval_every", "eval_steps",
                     "save_every", "keep", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.lr <= 0 or (self.warmup_steps or 0) < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("--lr must be positive; --warmup-steps, --grad-clip and --weight-decay not negative")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"--dtype {self.dtype!r}: use float32 or bfloat16")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.fsdp and world_size == 1:
            raise UserError("--fsdp shards across processes: run under torchrun --nproc_per_node N")
        micro = self.micro_batch_size or self.batch_size // world_size
        if self.batch_size % (world_size * micro):
            raise UserError(f"--batch-size {self.batch_size} must be a multiple of processes ({world_size}) x "
                            f"--micro-batch-size ({micro})")

    def check_source(self) -> None:
        """Where the model and the data come from."""
        if not self.corpus:
            raise UserError("no corpus: give --corpus SPEC (a built-in name, a file, a folder or a .jsonl)")
        if (self.preset is None) == (self.config is None):
            raise UserError("give exactly one of --preset NAME and --config FILE for the model shape")
        if self.vocab_size is not None and self.tokenizer is not None:
            raise UserError("give --vocab-size N (train a tokenizer) or --tokenizer PATH, not both")


# the decoder's linears that LoRA adapts by default: all of them (QLoRA, arXiv:2305.14314, finds that adapting
# every one, not only q and v as the LoRA paper did, is what matches full fine-tuning)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h30m' or plain seconds -> seconds."""
    parts = re.fullmatch(r"((\d+(\.\d+)?)([hms]?))+", text.strip())
    if not parts:
        raise UserError(f"--time-budget {text!r}: write a duration like 90s, 5m or 1h30m")
    units = {"h": 3600, "m": 60, "s": 1, "": 1}
    return sum(float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([hms]?)", text))


# ---- generation ----

@dataclass(frozen=True)
class GenerationConfig:
    """What to generate: how many tokens, how to sample them, when to stop."""
    max_new_tokens: int = option(256, "tokens to generate at most", metavar="N")
    temperature: float = option(0.8, "0 = greedy", metavar="T")
    top_k: int = option(0, "sample among the k most likely tokens (0 = off)", metavar="K")
    top_p: float = option(1.0, "nucleus: the smallest set with this mass (1 = off)", metavar="P")
    min_p: float = option(0.0, "drop tokens below min_p x the best one (0 = off)", metavar="P")
    repetition_penalty: float = option(1.0, "CTRL penalty on seen tokens (1 = off)", metavar="R")
    seed: int | None = option(None, "seed of the sampler, for reproducible output", metavar="S")
    stop_ids: tuple[int, ...] = option((), "stop on these ids besides the tokenizer's EOS ids", cli=False)
    stop_strings: tuple[str, ...] = option((), "stop string (repeatable)", flag="--stop", metavar="TEXT")
    ignore_eos: bool = option(False, "keep generating past the end-of-sequence token")
    # StreamingLLM (Xiao et al. 2023, arXiv:2309.17453): a bounded cache of the first tokens + the recent ones
    window: int | None = option(None, "keep only the sink tokens and the last W tokens in the KV cache: constant "
                                      "memory, and generation past the model's context", metavar="W")
    sink_tokens: int = option(4, "with --window: the first N tokens, which the cache always keeps", metavar="N")

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
            ("window", self.window is None or self.window >= 1, "at least 1 token"),
            ("sink_tokens", self.sink_tokens >= 0, ">= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise UserError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if any(s == "" for s in self.stop_strings):
            raise UserError("stop strings must not be empty")
