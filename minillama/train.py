"""The training loop: corpus -> tokenizer -> token shards -> AdamW steps -> checkpoint folders.

`minillama train --corpus shakespeare --preset tiny --vocab-size 512 --out runs/tiny --max-steps 200`
`torchrun --nproc_per_node 2 -m minillama train ...` runs the same loop on 2 processes (DDP, or --fsdp).

What it does differently from llama2.c and nanoGPT:
- the loss is a chunked, fused classifier + cross-entropy: the (B·T, V) logits never exist at once;
- the data position is the step counter (see data.py), and the checkpoint holds everything else that
  changes (optimizer, RNG states), so a resumed run's losses equal an uninterrupted run's exactly;
- N processes each take a slice of the same global batch, so they reproduce one process's losses.
The model stays single-device math; checkpointing, compile and DDP/FSDP are applied by parallelize().
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from minillama.config import UserError
from minillama.loss import CausalLMLoss, chunked_cross_entropy  # noqa: F401 (part of the API)
from minillama.model import Llama
from minillama.perf.distributed import parallelize

def optimizer_groups(model: Llama, weight_decay: float) -> list[dict]:
    """Weight decay on the matmul weights only: decaying norms, biases or embeddings pulls them toward 0,
    a value with no special meaning for a gain, an offset or a token's vector."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied head is the embedding, listed once
        if name.endswith(".bias") or "norm" in name or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of update number `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Trainer:
    """Optimizer steps on given batches: what train() loops over, and what a benchmark can drive.

    `config` is a TrainConfig (only its optimisation fields are read). Each process passes its own rows
    of the global batch to train_step; the returned loss is the mean over all processes.
    """

    def __init__(self, model: Llama, config, *, world_size: int = 1, device: torch.device | None = None,
                 total_steps: int | None = None):
        self.model, self.config, self.world_size = model, config, world_size
        self.device = device or torch.device("cpu")
        self.total_steps = total_steps or config.max_steps or 1
        self.step = 0  # optimizer updates done
        self.autocast_dtype = None
        if config.dtype == "bfloat16":
            if bf16_supported(self.device):
                self.autocast_dtype = torch.bfloat16
            else:
                print("note: this CPU has no native bfloat16 matmul; training in float32", file=sys.stderr)
        self.module = parallelize(CausalLMLoss(model), world_size, fsdp=config.fsdp, compile=config.compile,
                                  activation_checkpointing=config.activation_checkpointing, device=self.device)
        # fused AdamW: one kernel for all parameters (CPU and CUDA); FSDP's sharded DTensors need foreach
        self.optimizer = torch.optim.AdamW(optimizer_groups(model, config.weight_decay), lr=config.lr,
                                           betas=(0.9, 0.95), eps=1e-8, fused=not config.fsdp)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _gradient_sync(self, sync: bool):
        """Accumulating micro-batches: reduce the gradients across processes only after the last one."""
        if self.config.fsdp:
            self.module.set_requires_gradient_sync(sync)
        elif self.world_size > 1 and not sync:
            return self.module.no_sync()  # DDP
        return contextlib.nullcontext()

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world_size
        return value

    def _micro_batches(self, batch):
        micro = self.config.micro_batch_size or batch.shape[0]
        if batch.shape[0] % micro:
            raise UserError(f"batch of {batch.shape[0]} rows does not split into micro-batches of {micro}")
        return [batch[i:i + micro].to(self.device) for i in range(0, batch.shape[0], micro)]

    def train_step(self, batch: torch.Tensor) -> dict:
        """One optimizer update on this process's rows, batch (B, T+1). Returns loss, lr and grad_norm.
        Raises FloatingPointError, without updating, when the loss or the gradient is NaN or infinite."""
        c = self.config
        lr = lr_at(self.step, c.lr, c.min_lr if c.min_lr is not None else c.lr / 10, c.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self._micro_batches(batch)
        loss_sum = torch.zeros((), device=self.device)
        for i, rows in enumerate(micro_batches):
            with self._gradient_sync(i == len(micro_batches) - 1):
                with self._autocast():
                    loss = self.module(rows[:, :-1], rows[:, 1:])  # inputs, targets (B, T)
                # micro-batches hold equal numbers of targets: the mean of their means is the batch mean
                (loss / len(micro_batches)).backward()
            loss_sum += loss.detach()
        loss = self._mean_over_processes(loss_sum / len(micro_batches)).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), c.grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"loss {loss}, gradient norm {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> float:
        """Mean loss over batches, each (B, T+1) of this process's rows, averaged over processes."""
        losses = []
        for batch in batches:
            for rows in self._micro_batches(batch):
                with self._autocast():
                    losses.append(self.module(rows[:, :-1], rows[:, 1:]).float())
        if self.config.fsdp:  # the root keeps its gathered weights after a forward with no backward
            self.module.reshard()
        return self._mean_over_processes(torch.stack(losses).mean()).item()

    # ---- state for checkpoints: collective under FSDP, so every process calls these ----

    def optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # keyed by parameter name, gathered whole: loads into any world size or wrapping
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, self.optimizer, options=options)

    def load_optimizer_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def full_model(self) -> Llama | None:
        """The whole model on the CPU for saving: the model itself, or under FSDP its gathered shards
        (then only process 0 gets it, the others None)."""
        if not self.config.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)  # names start with "llama."
        if dist.get_rank() != 0:
            return None
        model = Llama(self.model.config)
        model.load_state_dict({k.removeprefix("llama."): v for k, v in state.items()},
                              strict=not self.model.config.tie_embeddings)
        return model


# ---- the run: configuration, data, checkpoints, logging, the loop ----


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything `minillama train` takes (the CLI only parses into this); defaults follow llama2.c."""
    corpus: list[str] = field(default_factory=list, metadata={"help": "built-in, text file, folder or .jsonl"})
    out: str = _field("", "run folder: tokenizer, data, checkpoints, log.jsonl, loss.png")
    preset: str | None = _field(None, "model shape by name (tiny, stories15M, ...)")
    config: str | None = _field(None, "model shape from a config JSON (HF config.json or our fields)")
    vocab_size: int | None = _field(None, "train a SentencePiece BPE tokenizer of this size into RUN/tokenizer")
    tokenizer: str | None = _field(None, "use this tokenizer (folder, .model, tokenizer.json, .gguf)")
    seq_len: int = _field(256, "T: tokens per training window (the model's max_seq_len)")
    batch_size: int = _field(32, "B: windows per optimizer step, over all processes")
    micro_batch_size: int | None = _field(None, "windows per forward pass (accumulating gradients); "
                                                "default B / processes")
    max_steps: int | None = _field(None, "optimizer steps")
    time_budget: str | None = _field(None, "train this long (90s, 5m, 1h30m); the cosine is planned from the "
                                           "speed of the first steps")
    lr: float = _field(5e-4, "peak learning rate")
    warmup_steps: int = _field(100, "linear warmup steps")
    min_lr: float | None = _field(None, "learning rate at the end of the cosine; default lr / 10")
    weight_decay: float = _field(0.1, "AdamW weight decay on matmul weights")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = _field(100, "validation loss every N steps")
    eval_steps: int = _field(10, "validation batches per evaluation")
    seed: int = _field(1337, "weights and the order of training windows")
    save_every: int | None = _field(None, "checkpoint every N steps; default at each evaluation")
    keep: int = _field(2, "keep the last K step checkpoints (RUN/final is kept too)")
    resume: bool = _field(False, "continue from the newest checkpoint in RUN")
    dtype: str = _field("float32", "float32, or bfloat16 autocast (weights and optimizer stay float32)")
    compile: bool = _field(False, "torch.compile each decoder layer")
    activation_checkpointing: bool = _field(False, "recompute each layer's activations in backward")
    fsdp: bool = _field(False, "shard weights, gradients and optimizer state across processes (FSDP2)")
    val_fraction: float = _field(0.05, "documents held out for validation")
    data_dir: str | None = _field(None, "token shard cache; default RUN/data")

    def check(self, world_size: int = 1) -> None:
        """Raise UserError naming the first bad field; called before any work starts."""
        if not self.corpus:
            raise UserError("no corpus: give --corpus SPEC (a built-in name, a file, a folder or a .jsonl)")
        if not self.out:
            raise UserError("no run folder: give --out RUN")
        if (self.preset is None) == (self.config is None):
            raise UserError("give exactly one of --preset NAME and --config FILE for the model shape")
        if self.vocab_size is not None and self.tokenizer is not None:
            raise UserError("give --vocab-size N (train a tokenizer) or --tokenizer PATH, not both")
        if self.max_steps is None and self.time_budget is None:
            raise UserError("give --max-steps N or --time-budget DURATION")
        for name in ("seq_len", "batch_size", "micro_batch_size", "max_steps", "eval_every", "eval_steps",
                     "save_every", "keep", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
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


@dataclass
class TrainResult:
    steps: int
    loss: float  # the last step's training loss
    val_loss: float | None  # the last evaluation's
    tokens_per_s: float  # mean over the run, first step (warm-up, compilation) excluded
    checkpoint: Path  # RUN/final


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h30m' or plain seconds -> seconds."""
    parts = re.fullmatch(r"((\d+(\.\d+)?)([hms]?))+", text.strip())
    if not parts:
        raise UserError(f"--time-budget {text!r}: write a duration like 90s, 5m or 1h30m")
    units = {"h": 3600, "m": 60, "s": 1, "": 1}
    return sum(float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([hms]?)", text))


# ---- processes ----


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over processes, so all of them stop at the same step."""
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]


def init_processes() -> tuple[Processes, bool]:
    """From the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, NCCL on GPU.
    Returns the processes and whether we created the process group (and so must destroy it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Processes(device=torch.device("cuda" if cuda else "cpu")), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(dist.get_rank(), world_size, device), created


# ---- tokenizer and data ----


def prepare_tokenizer(c: TrainConfig, run: Path, train_texts, procs: Processes):
    """--tokenizer PATH, or the run's own (trained once by process 0 with --vocab-size, reused on resume)."""
    from minillama.tokenizer import load_tokenizer

    if c.tokenizer:
        return load_tokenizer(c.tokenizer)
    folder = run / "tokenizer"
    if not (c.resume and folder.exists()):
        if c.vocab_size is None:
            raise UserError("no tokenizer: give --vocab-size N to train one, or --tokenizer PATH")
        if procs.rank == 0:
            from minillama.tokenizer_train import train_tokenizer

            tmp = run / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            train_tokenizer(train_texts(), c.vocab_size, tmp, seed=c.seed)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        procs.barrier()
    return load_tokenizer(folder)


def prepare_data(c: TrainConfig, run: Path, tokenizer, docs, procs: Processes):
    """Train and validation shards in RUN/data (or --data-dir), written by process 0 unless cached."""
    from minillama.data import TokenShards, pretokenize

    folder = Path(c.data_dir) if c.data_dir else run / "data"
    if procs.rank == 0:
        train_docs, val_docs = docs()
        pretokenize({"train": [d.text for d in train_docs], "val": [d.text for d in val_docs]}, tokenizer, folder)
    procs.barrier()
    return TokenShards(folder / "train"), TokenShards(folder / "val")


def build_model(c: TrainConfig, tokenizer) -> Llama:
    """The preset or config file, with the vocabulary and special ids of the tokenizer, max_seq_len = T."""
    from minillama.config import ModelConfig, preset

    base = preset(c.preset) if c.preset else ModelConfig.load(c.config)
    config = base.replace(vocab_size=tokenizer.vocab_size, max_seq_len=c.seq_len, bos_token_id=tokenizer.bos_id,
                          eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return Llama(config).init_weights(c.seed)


# ---- checkpoints: RUN/step_NNNNNN/ and RUN/final/, HF folders plus training_state.pt ----

STEP_FOLDER = re.compile(r"step_\d{6}")


def save_checkpoint(trainer: Trainer, folder: Path, tokenizer, c: TrainConfig, procs: Processes) -> None:
    """Weights, config and tokenizer (checkpoint.save_model) + training_state.pt, assembled under
    folder.tmp and renamed into place; all processes call this (FSDP gathers), process 0 writes."""
    from minillama.checkpoint import save_model

    state = {"step": trainer.step, "data_position": trainer.step,  # windows are a function of the step
             "total_steps": trainer.total_steps, "optimizer": trainer.optimizer_state(), "rng": _rng_state(),
             "config": dataclasses.asdict(c), "world_size": procs.world_size}
    model = trainer.full_model()
    if procs.rank == 0:
        tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp, tokenizer)
        torch.save(state, tmp / "training_state.pt")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        for stale in sorted(p for p in folder.parent.iterdir() if STEP_FOLDER.fullmatch(p.name))[:-c.keep]:
            shutil.rmtree(stale)
    procs.barrier()


def latest_checkpoint(run: Path) -> tuple[Path, int] | None:
    """The checkpoint folder of RUN with the highest step (final or step_NNNNNN), and that step."""
    found = []
    for folder in run.iterdir() if run.is_dir() else []:
        if (STEP_FOLDER.fullmatch(folder.name) or folder.name == "final") and (folder / "training_state.pt").exists():
            state = torch.load(folder / "training_state.pt", mmap=True, weights_only=True)
            found.append((state["step"], folder.name == "final", folder))
    return (max(found)[2], max(found)[0]) if found else None


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# ---- logging: the bar, one line per evaluation, log.jsonl and loss.png ----


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _si(x: float) -> str:
    return f"{x / 1e6:.1f}M" if x >= 1e6 else f"{x / 1e3:.0f}k" if x >= 1e3 else f"{x:.0f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_line(entry: dict, mfu: float, eta: float) -> str:
    """step 120 | loss 2.314 | lr 3.0e-04 | 52k tok/s | mfu 41% | eta 3m10s (| val 2.401)"""
    line = (f"step {entry['step']} | loss {entry['loss']:.3f} | lr {entry['lr']:.1e} | "
            f"{_si(entry['tokens_per_s'])} tok/s | mfu {mfu:.0%} | eta {_duration(eta)}")
    return line + (f" | val {entry['val_loss']:.3f}" if "val_loss" in entry else "")


def plot_losses(entries: list[dict], path: Path) -> None:
    """Train and validation loss against step, redrawn whole, written beside and renamed."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot([e["step"] for e in entries], [e["loss"] for e in entries], label="train", lw=1)
    val = [e for e in entries if "val_loss" in e]
    ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss", title=path.parent.name)
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a 1024³ matmul, best of 5 repeats: this machine's practical peak, the MFU denominator."""
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


class Reporter:
    """What process 0 shows and writes: the bar, a log line per evaluation, RUN/log.jsonl, RUN/loss.png."""

    def __init__(self, run: Path, trainer: Trainer, c: TrainConfig, procs: Processes, budget: float | None):
        from minillama.calc import flops_per_token

        self.run, self.trainer, self.budget, self.enabled = run, trainer, budget, procs.rank == 0
        self.tokens_per_step = c.batch_size * c.seq_len
        self.flops_per_step = flops_per_token(trainer.model.config, c.seq_len) * self.tokens_per_step
        self.peak = measure_peak_flops(procs.device, trainer.autocast_dtype or torch.float32) * procs.world_size
        self.times, self.entries, self.log = [], [], None  # step seconds of this session; log entries
        if self.enabled:
            path = run / "log.jsonl"  # a resumed run drops what was logged after its checkpoint
            lines = path.read_text().splitlines() if path.exists() else []
            self.entries = [e for line in lines if (e := json.loads(line))["step"] <= trainer.step]
            _write_atomic(path, "".join(json.dumps(e) + "\n" for e in self.entries))
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


# ---- train(): the loop ----


def train(config: TrainConfig, on_step=None) -> TrainResult:
    """Train as configured. on_step(trainer, entry) runs after each step's logging and saving (a hook for
    tests and notebooks: raising KeyboardInterrupt there acts as Ctrl-C)."""
    procs, created = init_processes()
    try:
        return _train(config, procs, on_step)
    finally:
        if created:
            dist.destroy_process_group()


def _train(c: TrainConfig, procs: Processes, on_step) -> TrainResult:
    from minillama.config import ModelConfig, preset
    from minillama.corpus import load_corpus, split

    c.check(procs.world_size)
    _ = preset(c.preset) if c.preset else ModelConfig.load(c.config)  # a bad name or file fails before any work
    run = Path(c.out)
    found = latest_checkpoint(run)
    if found and not c.resume:
        raise UserError(f"{run} already holds checkpoints ({found[0].name}); pass --resume to continue that "
                        "run, or choose a new --out")
    if c.resume and not found and procs.rank == 0:
        print(f"note: no checkpoint in {run} to resume from; starting at step 0", file=sys.stderr)
    if procs.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    docs = functools.cache(lambda: split(load_corpus(c.corpus), c.val_fraction, seed=0))
    tokenizer = prepare_tokenizer(c, run, lambda: [d.text for d in docs()[0]], procs)
    train_shards, val_shards = prepare_data(c, run, tokenizer, docs, procs)
    model = build_model(c, tokenizer).to(procs.device)
    if found:  # weights before parallelize (FSDP shards them); optimizer state after, when it exists
        from minillama.checkpoint import load_model

        saved = load_model(found[0])
        if saved.config != model.config:
            raise UserError(f"{found[0]}: the checkpoint's model config differs from this run's; resume "
                            "with the same --preset/--config, --seq-len and tokenizer")
        model.load_state_dict(saved.state_dict())
    trainer = Trainer(model, c, world_size=procs.world_size, device=procs.device,
                      total_steps=c.max_steps or 10**9)  # a time budget plans the steps after a few
    if found:
        state = torch.load(found[0] / "training_state.pt", weights_only=True)
        trainer.load_optimizer_state(state["optimizer"])
        trainer.step = state["step"]
        trainer.total_steps = c.max_steps or state["total_steps"]
        _set_rng_state(state["rng"])
    if procs.rank == 0:
        n, micro = sum(p.numel() for p in model.parameters()), c.micro_batch_size or c.batch_size // procs.world_size
        print(f"model {n / 1e6:.2f}M parameters | data {_si(train_shards.num_tokens)} train, "
              f"{_si(val_shards.num_tokens)} val tokens | batch {c.batch_size} x {c.seq_len} tokens: "
              f"{procs.world_size} process(es) x {c.batch_size // procs.world_size // micro} micro-batch(es) "
              f"of {micro} | {c.dtype}", file=sys.stderr)
    return _loop(trainer, c, procs, run, tokenizer, train_shards, val_shards, on_step)


def _loop(trainer: Trainer, c: TrainConfig, procs: Processes, run: Path, tokenizer, train_shards, val_shards,
          on_step) -> TrainResult:
    from minillama.data import RandomWindows, sequential_windows

    B, W, rank = c.batch_size, procs.world_size, procs.rank
    rows = slice(rank * B // W, (rank + 1) * B // W)  # this process's share of every global batch
    windows = RandomWindows(train_shards, c.seq_len, B, c.seed)
    val_batches = [b[rows] for b in sequential_windows(val_shards, c.seq_len, B, c.eval_steps)]
    budget = parse_duration(c.time_budget) if c.time_budget else None
    report = Reporter(run, trainer, c, procs, budget)
    start_step, start, saved_step = trainer.step, time.perf_counter(), trainer.step
    interrupted, previous_handler = _catch_sigint()
    try:
        while trainer.step < trainer.total_steps:
            t0 = time.perf_counter()
            try:
                metrics = trainer.train_step(windows.batch(trainer.step, rows))
            except FloatingPointError as e:
                last = latest_checkpoint(run)
                raise UserError(f"step {trainer.step + 1}: {e}: training stopped; the last good checkpoint is "
                                f"{last[0] if last else 'none (nothing saved yet)'}; try a lower --lr") from None
            report.times.append(time.perf_counter() - t0)
            step, elapsed = trainer.step, time.perf_counter() - start
            if budget is not None and c.max_steps is None and step - start_step == 4:
                _plan_steps(trainer, report.times, budget - elapsed, procs)
            stop, over = procs.any(interrupted.is_set(), budget is not None and elapsed > budget)
            entry = {"step": step, **metrics, "tokens_per_s": B * c.seq_len / report.times[-1]}
            if step % c.eval_every == 0 or step == trainer.total_steps or over:
                entry["val_loss"] = trainer.evaluate(val_batches)
            report.add(entry, elapsed)
            if step % (c.save_every or c.eval_every) == 0 and step < trainer.total_steps and not over:
                save_checkpoint(trainer, run / f"step_{step:06d}", tokenizer, c, procs)
                saved_step = step
            if on_step is not None:
                on_step(trainer, entry)
            if stop:
                raise KeyboardInterrupt
            if over:
                break
    except KeyboardInterrupt:
        if trainer.step > saved_step:  # a step completed since the last save: keep it
            save_checkpoint(trainer, run / f"step_{trainer.step:06d}", tokenizer, c, procs)
            report.write(f"interrupted: saved {run / f'step_{trainer.step:06d}'}; continue with --resume")
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        report.close()
    save_checkpoint(trainer, run / "final", tokenizer, c, procs)
    return report.result()


def _plan_steps(trainer: Trainer, times: list[float], remaining: float, procs: Processes) -> None:
    """--time-budget: how many steps fit, from the median of the last steps (the first includes warm-up);
    process 0's plan is everyone's."""
    per_step = sorted(times[1:])[len(times[1:]) // 2]
    total = torch.tensor([trainer.step + max(1, int(remaining / per_step))])
    if procs.world_size > 1:
        dist.broadcast(total, src=0)
    trainer.total_steps = int(total)


def _catch_sigint():
    """The first Ctrl-C asks the loop to stop after the current step, which it saves; a second one stops
    at once. (Only the main thread may set signal handlers.)"""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return event, None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        event.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    return event, previous


# ---- command line ----


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model on a corpus (torchrun for several processes)",
                              description="Train a tokenizer (or load one), pretokenize the corpus, train with "
                                          "AdamW and write checkpoint folders under RUN.")
    for f in dataclasses.fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=help)
        elif f.name == "corpus":
            p.add_argument(flag, nargs="+", required=True, metavar="SPEC", help=help)
        else:
            kind = next(t for t in typing.get_args(f.type) or [f.type] if t is not type(None))
            p.add_argument(flag, type=kind, default=f.default, required=f.name == "out",
                           metavar=f.name.upper(), help=help + ("" if f.default is None else f" (default {f.default})"))
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    result = train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
    if int(os.environ.get("RANK", "0")) == 0:
        val = f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""
        print(f"trained {result.steps} steps: loss {result.loss:.3f}{val}, "
              f"{_si(result.tokens_per_s)} tok/s; wrote {result.checkpoint}")
    return 0
