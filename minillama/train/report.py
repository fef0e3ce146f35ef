"""What a training run shows and writes: a progress bar, one log line per evaluation in the common format
(`step 120 | loss 2.314 | lr 3.0e-04 | 52k tok/s | mfu 41% | eta 3m10s | val 2.401`), RUN/log.jsonl and the
loss curve RUN/loss.png. MFU divides the model's FLOPs per step (model/calc.py) by this machine's measured
matmul peak."""

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minillama.checkpoint.atomic import write_atomic
from minillama.config import TrainConfig


@dataclass
class TrainResult:
    steps: int
    loss: float  # the last step's training loss
    val_loss: float | None  # the last evaluation's
    tokens_per_s: float  # mean over the run, first step (warm-up, compilation) excluded
    checkpoint: Path  # RUN/final


def si(x: float) -> str:
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e3 else f"{x:.0f}"


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_line(entry: dict, mfu: float, eta: float) -> str:
    """step 120 | loss 2.314 | lr 3.0e-04 | 52k tok/s | mfu 41% | eta 3m10s (| val 2.401)"""
    line = (f"step {entry['step']} | loss {entry['loss']:.3f} | lr {entry['lr']:.1e} | "
            f"{si(entry['tokens_per_s'])} tok/s | mfu {mfu:.0%} | eta {duration(eta)}")
    return line + (f" | val {entry['val_loss']:.3f}" if "val_loss" in entry else "")


def plot_losses(entries: list[dict], path: Path) -> None:
    """Train and validation loss against step, redrawn whole."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], label="train", lw=1)
    val = [e for e in entries if "val_loss" in e]
    ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss", title=path.parent.name)
    ax.legend()
    ax.grid(alpha=0.3)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_atomic(path, png.getvalue())


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a 1024³ matmul, best of 5 repeats: this machine's practical peak, the MFU denominator."""
    # its own generator: the global one is the run's (dropout), which a resumed run restores before this
    a = torch.randn(1024, 1024, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


class Reporter:
    """What process 0 shows and writes: the bar, a log line per evaluation, RUN/log.jsonl, RUN/loss.png."""

    def __init__(self, run: Path, trainer, c: TrainConfig, procs, budget: float | None,
                 flops_per_token: float | None = None):
        """flops_per_token: of a training step, for the MFU (default pretraining's, calc.flops_per_token)."""
        from minillama.model import calc

        self.run, self.trainer, self.budget, self.enabled = run, trainer, budget, procs.rank == 0
        self.tokens_per_step = c.batch_size * c.seq_len
        flops_per_token = flops_per_token or calc.flops_per_token(trainer.model.config, c.seq_len)
        self.flops_per_step = flops_per_token * self.tokens_per_step
        self.peak = measure_peak_flops(procs.device, trainer.autocast_dtype or torch.float32) * procs.world_size
        self.times, self.entries, self.log = [], [], None  # step seconds of this session; log entries
        if self.enabled:
            path = run / "log.jsonl"  # a resumed run drops what was logged after its checkpoint
            lines = path.read_text().splitlines() if path.exists() else []
            self.entries = [e for line in lines if (e := json.loads(line))["step"] <= trainer.step]
            write_atomic(path, "".join(json.dumps(e) + "\n" for e in self.entries))
            self.log = open(path, "a")
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=not self.enabled, unit="step",
                        dynamic_ncols=True)

    def add(self, entry: dict, elapsed: float) -> None:
        if not self.enabled:
            return
        self.log.write(json.dumps(entry) + "\n")
        self.log.flush()
        self.entries.append(entry)
        recent = sum(self.times[-20:]) / len(self.times[-20:])  # smoother than one step
        eta = (self.trainer.total_steps - entry["step"]) * recent
        if self.budget is not None:
            eta = min(eta, self.budget - elapsed)
        line = log_line(entry | {"tokens_per_s": self.tokens_per_step / recent},
                        self.flops_per_step / recent / self.peak, max(0.0, eta))
        self.bar.total = self.trainer.total_steps
        self.bar.set_postfix_str(line.split(" | ", 1)[1], refresh=False)
        self.bar.update()
        if "val_loss" in entry:
            self.bar.write(line)
            plot_losses(self.entries, self.run / "loss.png")

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()

    def result(self) -> TrainResult:
        last_val = next((e["val_loss"] for e in reversed(self.entries) if "val_loss" in e), None)
        timed = self.times[1:] or self.times  # the first step includes warm-up (and compilation)
        return TrainResult(self.trainer.step, self.entries[-1]["loss"] if self.entries else float("nan"), last_val,
                           self.tokens_per_step * len(timed) / max(sum(timed), 1e-9), self.run / "final")
