"""`minillama bench train`: training tokens/s of minillama against transformers' LlamaForCausalLM.

Both train the same weights (copied from one seeded init) on the same batches, with the same AdamW,
gradient clipping and dtype policy (fp32, or bf16 autocast with fp32 weights), in the same process.
minillama is driven through train.Trainer, so this measures the step `minillama train` runs; with
--compile it is measured a second time with each decoder layer compiled. transformers is run as its
users run it: eager, SDPA attention, loss from `model(input_ids, labels=...)` (its full-vocabulary
logits and log-softmax).

The machine may be shared, so the contenders alternate within each round (a slow minute hurts all of
them), rounds repeat, medians are reported, and each measurement records how busy the CPU was with
other processes (common.CpuMeter).
"""

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field

import torch

from minillama.bench.common import CpuMeter, hf_twin
from minillama.config import UserError, preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Contender:
    name: str
    step: object  # step(batch (B, T+1)) -> loss (float)
    speeds: list = field(default_factory=list)  # tokens/s of each timed round
    others: list = field(default_factory=list)  # share of the machine other processes used, per round


# ---- the contenders ----

def minillama_step(model, args, dtype: str, compile: bool):
    from minillama.config import TrainConfig
    from minillama.train.trainer import Trainer

    config = TrainConfig(corpus=["bench"], out="bench", preset=args.preset, seq_len=args.seq_len,
                         batch_size=args.batch_size, max_steps=10**6, dtype=dtype, compile=compile)
    trainer = Trainer(model, config)
    return lambda batch: trainer.train_step(batch)["loss"]


def transformers_step(model, dtype: str):
    """transformers' LlamaForCausalLM with our weights; the loss as its users compute it, with the
    targets given as shift_labels so both contenders fit exactly the same next tokens."""
    from minillama.train.trainer import bf16_supported, optimizer_groups

    hf = hf_twin(model).train()  # SDPA attention: transformers' default and fastest
    optimizer = torch.optim.AdamW(optimizer_groups(hf, 0.1), lr=5e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    cpu = torch.device("cpu")
    autocast = dtype == "bfloat16" and bf16_supported(cpu)

    def step(batch):
        inputs, targets = batch[:, :-1], batch[:, 1:].contiguous()  # (B, T) each
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = hf(input_ids=inputs, labels=inputs, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_contenders(args, dtype: str) -> list[Contender]:
    from minillama.model import Llama

    config = preset(args.preset).replace(max_seq_len=args.seq_len)
    base = Llama(config).init_weights(0)

    def copy():  # each contender trains its own copy of the same weights
        model = Llama(config)
        model.load_state_dict(base.state_dict())
        return model

    contenders = [Contender("transformers", transformers_step(copy(), dtype)),
                  Contender("minillama", minillama_step(copy(), args, dtype, compile=False))]
    if args.compile:
        contenders.append(Contender("minillama --compile", minillama_step(copy(), args, dtype, compile=True)))
    return contenders


# ---- measuring ----

def check_same_loss(contenders: list[Contender], batch, dtype: str) -> list[float]:
    """The first step of every contender on the same batch: equal losses show equal weights and task."""
    losses = [c.step(batch) for c in contenders]
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    if max(losses) - min(losses) > tolerance * max(1.0, abs(losses[0])):
        raise RuntimeError(f"first-step losses differ: {dict(zip([c.name for c in contenders], losses))}")
    return losses


def measure(contenders: list[Contender], batches, args) -> None:
    """Warm-up round(s), then `rounds` rounds; in each, every contender runs `steps` steps, in an order
    that rotates from round to round."""
    tokens = args.steps * args.batch_size * args.seq_len
    for r in range(args.warmup + args.rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for c in order:
            with CpuMeter() as meter:
                for i in range(args.steps):
                    c.step(batches[(r * args.steps + i) % len(batches)])
            if r >= args.warmup:
                c.speeds.append(tokens / meter.seconds)
                c.others.append(meter.others)
        if r >= args.warmup:
            print(f"  round {r - args.warmup + 1}: " + " | ".join(f"{c.name} {c.speeds[-1]:,.0f} tok/s" for c in order),
                  file=sys.stderr)


def peak_flops(dtype: str, repeats: int = 3) -> float:
    """The matmul peak (train.measure_peak_flops), best of a few tries: the machine when we had it."""
    from minillama.train.report import measure_peak_flops

    return max(measure_peak_flops(torch.device("cpu"), DTYPES[dtype]) for _ in range(repeats))


def report(results: list[tuple[str, list[Contender], float, list[float]]], args) -> None:
    from minillama.model.calc import flops_per_token

    flops = flops_per_token(preset(args.preset).replace(max_seq_len=args.seq_len), args.seq_len)
    print(f"\n{args.preset}, batch {args.batch_size} x {args.seq_len}, {args.steps} steps x {args.rounds} rounds "
          f"(median), {torch.get_num_threads()} threads, {flops / 1e6:.0f} MFLOP/token")
    print(f"{'dtype':9} {'contender':20} {'tok/s':>8} {'vs hf':>6} {'mfu':>5} {'others':>7}  "
          f"{'first loss':>10}  rounds (tok/s)")
    for dtype, contenders, peak, losses in results:
        reference = statistics.median(contenders[0].speeds)
        for c, loss in zip(contenders, losses):
            speed = statistics.median(c.speeds)
            others = [o for o in c.others if o is not None]
            busy = f"{statistics.median(others):.0%}" if others else "n/a"
            rounds = " ".join(f"{s:,.0f}" for s in c.speeds)
            print(f"{dtype:9} {c.name:20} {speed:8,.0f} {speed / reference:5.2f}x {flops * speed / peak:5.0%} "
                  f"{busy:>7}  {loss:10.4f}  {rounds}")
        print(f"{dtype:9} {'matmul peak':20} {peak / 1e9:8,.0f} GFLOP/s (1024^3 matmul, best of the run)")
    print(f"others = CPU share used by other processes during the measurement; load average "
          f"{os.getloadavg()[0]:.1f} at the end")


def run_bench(args) -> None:
    for dtype in args.dtypes:
        if dtype not in DTYPES:
            raise UserError(f"--dtypes {dtype}: use float32 and/or bfloat16")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        raise UserError("--steps and --rounds must be at least 1, --warmup at least 0")
    torch.manual_seed(0)
    V = preset(args.preset).vocab_size
    batches = [torch.randint(0, V, (args.batch_size, args.seq_len + 1)) for _ in range(4)]  # (B, T+1) each
    results = []
    for dtype in args.dtypes:
        print(f"{dtype}: building the contenders, checking their first losses agree ...", file=sys.stderr)
        contenders = build_contenders(args, dtype)
        losses = check_same_loss(contenders, batches[0], dtype)
        peak = peak_flops(dtype)
        measure(contenders, batches, args)
        results.append((dtype, contenders, max(peak, peak_flops(dtype)), losses))
        del contenders
    report(results, args)


def train_bench_flags(p) -> None:
    p.add_argument("--preset", default="stories15M", help="model shape (default stories15M)")
    p.add_argument("--batch-size", type=int, default=8, help="B (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="T (default 256)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per contender per round (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation, caches; default 1)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="float32 and/or bfloat16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure minillama with torch.compile per decoder layer (default on)")
