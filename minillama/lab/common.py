"""What every lab experiment shares: the printed table and the JSON and PNG it leaves behind; and what several
need: a progress bar, corpus text, a short training run with the real Trainer, and attention weights."""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import torch

from minillama.checkpoint.atomic import write_atomic


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as an aligned text table; floats with 4 significant digits."""
    columns = columns or list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def to_json(value, indent: str = "") -> str:
    """JSON with one line per leaf: a list or dict holding no list or dict (a curve's point, a row of a
    table) stays on its line, so a training history reads as one line a step, not ten."""
    nested = isinstance(value, (list, dict)) and any(
        isinstance(v, (list, dict)) for v in (value.values() if isinstance(value, dict) else value))
    if not nested:
        return json.dumps(value, default=str)
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    return "[\n" + ",\n".join(inner + to_json(v, inner) for v in value) + f"\n{indent}]"


def save(out: Path, name: str, results: dict, figure=None) -> None:
    """out/NAME.json with the numbers and, given a matplotlib Figure, out/NAME.png."""
    write_atomic(Path(out) / f"{name}.json", to_json(results) + "\n")
    if figure is not None:
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110, bbox_inches="tight")
        write_atomic(Path(out) / f"{name}.png", png.getvalue())


def figure(n_plots: int = 1, width: float = 6.0, height: float = 4.0, rows: int = 1):
    """A matplotlib Figure with n axes on `rows` rows (no pyplot: no global state, no GUI)."""
    from matplotlib.figure import Figure

    cols = -(-n_plots // rows)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_plots)]
    return fig, axes


# ---- models trained side by side for the same time (lab experts, lab attention) ----

def shakespeare_bytes(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shakespeare's training and validation text as UTF-8 byte ids 0..255 (vocab_size 256, no tokenizer),
    at most `limit` bytes of training text. Returns (train, val), 1-D int64."""
    from minillama.data.corpus import load_corpus, split

    train, val = split(load_corpus("shakespeare"))
    as_ids = lambda docs: torch.frombuffer(bytearray("\n".join(d.text for d in docs).encode()),  # noqa: E731
                                           dtype=torch.uint8).long()
    return as_ids(train)[:limit], as_ids(val)


def windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator) -> torch.Tensor:
    """batch_size random windows of seq_len + 1 tokens of the stream ids: (B, T+1)."""
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator).tolist()
    return torch.stack([ids[s:s + seq_len + 1] for s in starts])


def train_side_by_side(models: dict, train_ids, val_ids, seconds: float, *, batch_size: int, seq_len: int,
                       lr: float, on_step=None, seed: int = 0) -> dict:
    """Train every model for `seconds` of its own training time with minillama's Trainer (AdamW, constant lr
    after a short warmup), in turns: each round gives every model the same batch, so a busy moment of the
    shared machine slows them all alike. on_step(name, step, model) runs after each step, off the clock.
    Returns {name: {"steps", "seconds", "losses" [(seconds, loss)], "val_loss"}}."""
    with one_thread():
        return _side_by_side(models, train_ids, val_ids, seconds, batch_size, seq_len, lr, on_step, seed)

# ---- what several experiments need: a progress bar, text, a short training run, attention weights ----

def progress(total: int, desc: str):
    """The experiment's progress bar, on stderr so the table on stdout stays clean."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)


def corpus_texts(name: str, train_bytes: int | None = None, val_bytes: int | None = None) -> tuple[list, list]:
    """Training and validation documents of a corpus: the held-out 5% that `minillama train` uses. A byte
    limit keeps whole documents (the last one cut) up to about that many bytes of UTF-8 on its side."""
    from minillama.data.corpus import load_corpus, split

    def cut(texts, limit):
        kept, size = [], 0
        for text in texts:
            if limit is not None and size >= limit:
                break
            if limit is not None and len(text.encode()) > limit - size:
                text = text.encode()[:limit - size].decode(errors="ignore")
            kept.append(text)
            size += len(text.encode())
        return kept

    train, val = split(load_corpus(name))
    return cut((d.text for d in train), train_bytes), cut((d.text for d in val), val_bytes)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """BOS + tokens + EOS of every document, concatenated: the stream data/shards.py trains on. (N,) int64"""
    ids = [i for text in texts for i in tokenizer.encode(text, bos=True, eos=True)]
    return torch.tensor(ids, dtype=torch.long)


def byte_stream(texts: list[str]) -> torch.Tensor:
    """The UTF-8 bytes of the documents as token ids 0..255 (a model with vocab_size 256 needs no tokenizer)."""
    data = "\n\n".join(texts).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


@contextlib.contextmanager
def one_thread():
    """Run the small models of the lab on one thread: their matrices are too small to share between cores,
    and on a busy machine OpenMP's waiting workers can make a step tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _side_by_side(models, train_ids, val_ids, seconds, batch_size, seq_len, lr, on_step, seed) -> dict:
    import time

    from tqdm import tqdm

    from minillama.config import TrainConfig
    from minillama.train.trainer import Trainer

    config = TrainConfig(lr=lr, min_lr=lr, warmup_steps=20, max_steps=10**9)
    trainers = {name: Trainer(model, config) for name, model in models.items()}
    runs = {name: {"steps": 0, "seconds": 0.0, "losses": []} for name in models}
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=int(seconds * len(models)), desc="training", unit="s", file=sys.stderr, leave=False)
    while any(r["seconds"] < seconds for r in runs.values()):
        batch = windows(train_ids, batch_size, seq_len, generator)
        for name, trainer in trainers.items():
            run = runs[name]
            if run["seconds"] >= seconds:
                continue
            start = time.perf_counter()
            loss = trainer.train_step(batch)["loss"]
            spent = time.perf_counter() - start
            bar.update(int(run["seconds"] + spent) - int(run["seconds"]))
            run["seconds"] += spent
            run["steps"] += 1
            run["losses"].append((run["seconds"], loss))
            if on_step is not None:
                on_step(name, run["steps"], models[name])
    bar.close()
    val = [windows(val_ids, batch_size, seq_len, torch.Generator().manual_seed(seed + 1)) for _ in range(8)]
    for name, trainer in trainers.items():
        runs[name]["val_loss"] = trainer.evaluate(val)  # the language-model loss alone (no router losses)
    return runs


def train_steps(model, ids: torch.Tensor, steps: int, *, batch_size: int, seq_len: int, lr: float,
                warmup_steps: int | None = None, grad_clip: float = 1.0, seed: int = 0, bar=None) -> list[dict]:
    """Train `model` in place with minillama's Trainer (AdamW, warmup + cosine, clipping) on random windows
    of the 1-D stream `ids`. Returns each step's {"step", "loss", "grad_norm"}; a non-finite loss or gradient
    ends the run with a last entry {"step", "loss": nan, "diverged": True}."""
    from minillama.config import TrainConfig
    from minillama.train.trainer import Trainer

    config = TrainConfig(max_steps=steps, lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip, seed=seed)
    trainer = Trainer(model, config)
    generator = torch.Generator().manual_seed(seed)
    history = []
    with one_thread():
        for step in range(1, steps + 1):
            starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator).tolist()
            batch = torch.stack([ids[s:s + seq_len + 1] for s in starts])  # (B, T+1)
            try:
                metrics = trainer.train_step(batch)
            except FloatingPointError:
                history.append({"step": step, "loss": float("nan"), "diverged": True})
                break
            finally:
                if bar is not None:
                    bar.update(1)
            history.append({"step": step, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})
    return history


def small_llama(vocab_size: int, dim: int, layers: int, seq_len: int, heads: int = 4):
    """The lab's small Llama, initialised with seed 0: the `tiny` preset with this width, depth and vocabulary,
    multi-head attention, SwiGLU width from Llama 2's rule (multiple of 32)."""
    from minillama.config import preset
    from minillama.model import Llama

    config = preset("tiny").replace(vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                                    hidden_dim=None, multiple_of=32, max_seq_len=seq_len)
    return Llama(config).init_weights(0)


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each distribution along the last dimension (0 · log 0 counts 0)."""
    return -(p * p.clamp_min(1e-30).log2()).sum(-1)


def bits(model, ids: torch.Tensor, context: int) -> dict:
    """Cross-entropy of the model on `ids` (every token but the first, windows of `context` tokens, stride
    context/2): {"nll" (nats, total), "tokens", "bits_per_token"}."""
    from minillama.evaluate.perplexity import perplexity

    with one_thread():
        r = perplexity(model, ids, context, max(1, context // 2))
    return {"nll": r["nll"], "tokens": r["tokens"], "bits_per_token": r["nll"] / math.log(2) / r["tokens"]}


def smollm2(model=None, tokenizer=None):
    """SmolLM2-135M-Instruct and its tokenizer (a test passes its session's copy; ~15 s to load). Plain: every
    weight a float32 nn.Linear, the reference, as the lab looks inside the layers and compares batch shapes
    (the fast path's prefill of many rows runs the 4-bit blocks in bf16)."""
    if model is None or tokenizer is None:
        from minillama.checkpoint import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2", plain=True)
    return model, tokenizer


@torch.no_grad()
def attention_weights(model, ids, attention_mask=None) -> list[torch.Tensor]:
    """Every layer's attention weights (B, H, T, S) for input_ids (B, T), from the model's own plain
    reference_attention: with one-hot values, softmax(q·kᵀ/√D)·v *is* the weights. The keys and queries are
    those the layer computes (a pre-hook reads its inputs: x, rope, mask); the model is not changed. A rope
    that is a Positions (ALiBi, ReRoPE, ...) places them itself, its attend given the reference kernel."""
    from minillama.model.llama import reference_attention
    from minillama.model.positions import Positions
    from minillama.model.rope import apply_rope

    captured = []

    def read(attn, args):
        x, rope, mask = args[:3]
        B, T, _ = x.shape
        H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if not isinstance(rope, Positions):
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        blocks = []
        for start in range(0, T, D):  # D one-hot value columns at a time (the output has D channels)
            width = min(D, T - start)
            v = torch.zeros(B, K, T, D, dtype=q.dtype)  # (B, K, S, D): key s carries a 1 in channel s - start
            v[:, :, start:start + width, :width] = torch.eye(width, dtype=q.dtype)
            y = rope.attend(q, k, v, mask, reference_attention) if isinstance(rope, Positions) \
                else reference_attention(q, k, v, mask)  # (B, H, T, D)
            blocks.append(y[..., :width])  # (B, H, T, width)
        captured.append(torch.cat(blocks, dim=-1))  # (B, H, T, S)

    hooks = [layer.self_attn.register_forward_pre_hook(read) for layer in model.layers]
    try:
        model.hidden_states(ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return captured
