"""What every lab experiment shares: the printed table and the JSON and PNG it leaves behind."""

import contextlib
import io
import json
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


def save(out: Path, name: str, results: dict, figure=None) -> None:
    """out/NAME.json with the numbers and, given a matplotlib Figure, out/NAME.png."""
    write_atomic(Path(out) / f"{name}.json", json.dumps(results, indent=1, default=str) + "\n")
    if figure is not None:
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110, bbox_inches="tight")
        write_atomic(Path(out) / f"{name}.png", png.getvalue())


def figure(n_plots: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure with n side-by-side axes (no pyplot: no global state, no GUI)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_plots, height))
    axes = [fig.add_subplot(1, n_plots, i + 1) for i in range(n_plots)]
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


@contextlib.contextmanager
def one_thread():
    """Run tiny models on one thread: on a shared 2-core machine two OpenMP threads wait on each other
    whenever another process holds a core, and a tiny model's step then takes 10x longer, erratically
    (tests/test_train.py does the same)."""
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
