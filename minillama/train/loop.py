"""The training loop: corpus -> tokenizer -> token shards -> Trainer steps -> checkpoint folders.

`minillama train --corpus shakespeare --preset tiny --vocab-size 512 --out runs/tiny --max-steps 200`
`torchrun --nproc_per_node 2 -m minillama train ...` runs the same loop on 2 processes (DDP, or --fsdp).

Fine-tuning (finetune.py) runs the same loop with its own batches, loss module and checkpoint writer.

What it does differently from llama2.c and nanoGPT:
- the loss is a chunked, fused classifier + cross-entropy: the (B·T, V) logits never exist at once (loss.py);
- the data position is the step counter (data/shards.py), and the checkpoint holds everything else that
  changes (optimizer, RNG states; checkpoint/run_state.py), so a resumed run's losses equal an
  uninterrupted run's exactly;
- N processes each take a slice of the same global batch, so they reproduce one process's losses.
The model stays single-device math; checkpointing, compile and DDP/FSDP are applied by parallelize().
"""

import functools
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minillama.checkpoint import run_state
from minillama.checkpoint.atomic import atomic_folder
from minillama.config import ModelConfig, TrainConfig, UserError, parse_duration, preset
from minillama.model import Llama
from minillama.perf.distributed import Processes, init_processes
from minillama.train.report import Reporter, TrainResult, si
from minillama.train.trainer import DEFAULT_WARMUP, Trainer


def model_shape(c: TrainConfig) -> ModelConfig:
    from minillama.checkpoint.hf import read_config

    return preset(c.preset) if c.preset else read_config(c.config)


# ---- tokenizer, data and model ----

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
            from minillama.tokenizer.train import train_tokenizer

            with atomic_folder(folder) as tmp:
                train_tokenizer(train_texts(), c.vocab_size, tmp, seed=c.seed)
        procs.barrier()
    return load_tokenizer(folder)


def prepare_data(c: TrainConfig, run: Path, tokenizer, docs, procs: Processes):
    """Train and validation shards in RUN/data (or --data-dir), written by process 0 unless cached."""
    from minillama.data.shards import TokenShards, pretokenize

    folder = Path(c.data_dir) if c.data_dir else run / "data"
    if procs.rank == 0:
        train_docs, val_docs = docs()
        pretokenize({"train": [d.text for d in train_docs], "val": [d.text for d in val_docs]}, tokenizer, folder)
    procs.barrier()
    return TokenShards(folder / "train"), TokenShards(folder / "val")


def build_model(c: TrainConfig, tokenizer) -> Llama:
    """The preset or config file, with the vocabulary and special ids of the tokenizer, max_seq_len = T."""
    base = model_shape(c)
    config = base.replace(vocab_size=tokenizer.vocab_size, max_seq_len=c.seq_len, bos_token_id=tokenizer.bos_id,
                          eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return Llama(config).init_weights(c.seed)


# ---- train(): the loop ----

def train(config: TrainConfig, on_step=None) -> TrainResult:
    """Train as configured. on_step(trainer, entry) runs after each step's logging and saving (a hook for
    tests and notebooks: raising KeyboardInterrupt there acts as Ctrl-C)."""
    return in_processes(_train, config, on_step)


def in_processes(run, config, on_step):
    """run(config, procs, on_step) in the process group torchrun started (or alone), destroyed after."""
    procs, created = init_processes()
    try:
        return run(config, procs, on_step)
    finally:
        if created:
            dist.destroy_process_group()


def open_run(c: TrainConfig, procs: Processes) -> tuple[Path, tuple[Path, int] | None]:
    """The run folder, created, and its newest checkpoint when resuming; a run with checkpoints is never
    overwritten without --resume."""
    run = Path(c.out)
    found = run_state.latest_checkpoint(run)
    if found and not c.resume:
        raise UserError(f"{run} already holds checkpoints ({found[0].name}); pass --resume to continue that "
                        "run, or choose a new --out")
    if c.resume and not found and procs.rank == 0:
        print(f"note: no checkpoint in {run} to resume from; starting at step 0", file=sys.stderr)
    if procs.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    return run, found


class WindowBatches:
    """Pretraining's batches: random windows of the train shards (a function of the step), and consecutive
    windows of the validation shards."""

    def __init__(self, c: TrainConfig, train_shards, val_shards):
        from minillama.data.shards import RandomWindows

        self.c, self.val_shards = c, val_shards
        self.windows = RandomWindows(train_shards, c.seq_len, c.batch_size, c.seed)

    def batch(self, step: int, rows: slice):
        return self.windows.batch(step, rows)  # (B, T+1)

    def validation(self, rows: slice) -> list:
        from minillama.data.shards import sequential_windows

        c = self.c
        return [b[rows] for b in sequential_windows(self.val_shards, c.seq_len, c.batch_size, c.eval_steps)]


def _train(c: TrainConfig, procs: Processes, on_step) -> TrainResult:
    from minillama.data.corpus import load_corpus, split

    c.check(procs.world_size)
    model_shape(c)  # a bad name or file fails before any work
    run, found = open_run(c, procs)
    docs = functools.cache(lambda: split(load_corpus(c.corpus), c.val_fraction, seed=0))
    tokenizer = prepare_tokenizer(c, run, lambda: [d.text for d in docs()[0]], procs)
    train_shards, val_shards = prepare_data(c, run, tokenizer, docs, procs)
    model = build_model(c, tokenizer).to(procs.device)
    if found:  # weights before parallelize (FSDP shards them); optimizer state after, when it exists
        run_state.load_weights(found[0], model)
    trainer = Trainer(model, c, world_size=procs.world_size, device=procs.device,
                      total_steps=c.max_steps or 10**9)  # a time budget plans the steps after a few
    if found:
        run_state.restore(trainer, found[0], c.max_steps)
    if procs.rank == 0:
        n, micro = sum(p.numel() for p in model.parameters()), c.micro_batch_size or c.batch_size // procs.world_size
        print(f"model {n / 1e6:.2f}M parameters | data {si(train_shards.num_tokens)} train, "
              f"{si(val_shards.num_tokens)} val tokens | batch {c.batch_size} x {c.seq_len} tokens: "
              f"{procs.world_size} process(es) x {c.batch_size // procs.world_size // micro} micro-batch(es) "
              f"of {micro} | {c.dtype}", file=sys.stderr)
        note_warmup(trainer)
    save = functools.partial(run_state.save_checkpoint, trainer, tokenizer=tokenizer, config=c, procs=procs)
    return run_loop(trainer, c, procs, run, WindowBatches(c, train_shards, val_shards), save, on_step)


def run_loop(trainer: Trainer, c: TrainConfig, procs: Processes, run: Path, data, save, on_step,
             flops_per_token: float | None = None) -> TrainResult:
    """Steps until max_steps, the time budget or Ctrl-C: log, evaluate, save(folder) every save_every steps
    and at the end to RUN/final. data.batch(step, rows) is step's batch (this process's rows),
    data.validation(rows) the validation batches; flops_per_token for the MFU (default pretraining's)."""
    B, W, rank = c.batch_size, procs.world_size, procs.rank
    rows = slice(rank * B // W, (rank + 1) * B // W)  # this process's share of every global batch
    val_batches = data.validation(rows)
    budget = parse_duration(c.time_budget) if c.time_budget else None
    report = Reporter(run, trainer, c, procs, budget, flops_per_token)
    start_step, start, saved_step = trainer.step, time.perf_counter(), trainer.step
    interrupted, previous_handler = _catch_sigint()
    try:
        while trainer.step < trainer.total_steps:
            t0 = time.perf_counter()
            try:
                metrics = trainer.train_step(data.batch(trainer.step, rows))
            except FloatingPointError as e:
                last = run_state.latest_checkpoint(run)
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
                save(run / f"step_{step:06d}")
                saved_step = step
            if on_step is not None:
                on_step(trainer, entry)
            if stop:
                raise KeyboardInterrupt
            if over:
                break
    except KeyboardInterrupt:
        if trainer.step > saved_step:  # a step completed since the last save: keep it
            save(run / f"step_{trainer.step:06d}")
            report.write(f"interrupted: saved {run / f'step_{trainer.step:06d}'}; continue with --resume")
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        report.close()
    save(run / "final")
    return report.result()


def _plan_steps(trainer: Trainer, times: list[float], remaining: float, procs: Processes) -> None:
    """--time-budget: how many steps fit, from the median of the last steps (the first includes warm-up);
    process 0's plan is everyone's."""
    per_step = sorted(times[1:])[len(times[1:]) // 2]
    total = torch.tensor([trainer.step + max(1, int(remaining / per_step))])
    if procs.world_size > 1:
        dist.broadcast(total, src=0)
    trainer.total_steps = int(total)
    if procs.rank == 0:
        note_warmup(trainer)


def note_warmup(trainer: Trainer) -> None:
    if trainer.config.warmup_steps is None and trainer.warmup_steps < DEFAULT_WARMUP:
        print(f"note: warmup {trainer.warmup_steps} steps, not {DEFAULT_WARMUP}: a tenth of this "
              f"{trainer.total_steps}-step run, so the learning rate peaks and decays", file=sys.stderr)


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

def train_flags(p) -> None:
    from minillama.cli import add_fields

    add_fields(p, TrainConfig)


def train_command(args) -> None:
    import os

    from minillama.cli import from_fields

    result = train(from_fields(TrainConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        val = f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""
        print(f"trained {result.steps} steps: loss {result.loss:.3f}{val}, "
              f"{si(result.tokens_per_s)} tok/s; wrote {result.checkpoint}")
