"""`minillama bench moe`: the mixture-of-experts forward against transformers' MixtralForCausalLM, on the
same random weights (ours saved as a Mixtral folder, read by from_pretrained with its defaults: SDPA
attention and its grouped-matmul experts). Ours runs as every command runs it, after perf/fast.make_fast:
its matmuls FastLinear (C++ kernels for the few rows of a decode step), the layers their reference forward.

Two measurements, each a ratio of speeds taken in the same run, contenders alternating within rounds:
  forward   a batch of B x T tokens through the whole model to the logits (prefill / inference shape);
  decode    batch 1: a 16-token prompt, then one token at a time with each side's KV cache, greedy,
            timed from the first decode step to the last.
The default shape is a Mixtral cut down to what two cores run in seconds (8 experts, top 2, Mixtral's
width ratios) with a 4,096-token vocabulary, so the LM head is a small share of the work as in Mixtral
(1%; with 32k tokens at dim 512 it would be 60%, and the benchmark would time the head); --dim, --layers
and --vocab scale it.
"""

import statistics
import sys
import tempfile

import torch

from minillama.bench.common import CpuMeter, import_transformers
from minillama.config import ModelConfig, UserError

PROMPT = 16


def bench_shape(dim: int, layers: int, vocab: int = 4096) -> ModelConfig:
    """Mixtral-8x7B's proportions (ffn 3.5 x dim, 8 experts, top 2, 4 query heads per kv head) at `dim`."""
    return ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 256,
                       hidden_dim=dim * 7 // 2, n_experts=8, experts_per_token=2, max_seq_len=1024,
                       rope_theta=1e6, model_type="mixtral")


def contenders(config: ModelConfig):
    """(ours, transformers') on the same weights, both in eval mode; raises if their logits differ."""
    from minillama.checkpoint import save_model
    from minillama.model import Llama
    from minillama.perf.fast import make_fast

    transformers = import_transformers()
    ours = Llama(config).init_weights(0).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_model(ours, folder)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    make_fast(ours)  # the default path (load_model_and_tokenizer applies it too)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        diff = (ours(ids) - theirs(input_ids=ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"logits differ by {diff:.2g}: not the same model")
    return ours, theirs


@torch.no_grad()
def decode_ours(model, prompt, steps: int) -> float:
    """Seconds for `steps` greedy decode steps after the prompt, with our cache."""
    cache = model.new_cache(1, PROMPT + steps)
    token = model(prompt, cache=cache)[:, -1:].argmax(-1)  # (1, 1)
    with CpuMeter() as meter:
        for _ in range(steps):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
    return meter.seconds


@torch.no_grad()
def decode_theirs(model, prompt, steps: int) -> float:
    out = model(input_ids=prompt, use_cache=True)
    token, cache = out.logits[:, -1:].argmax(-1), out.cache
    with CpuMeter() as meter:
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token, cache = out.logits[:, -1:].argmax(-1), out.cache
    return meter.seconds


@torch.no_grad()
def forward_seconds(run, ids) -> float:
    with CpuMeter() as meter:
        run(ids)
    return meter.seconds


def run_bench(config: ModelConfig, batch: int, seq_len: int, steps: int, rounds: int) -> dict:
    """Median tokens/s of each side and their ratio (ours / transformers'), forward and decode."""
    ours, theirs = contenders(config)
    torch.manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    prompt = ids[:1, :PROMPT]
    runs = {"forward": (lambda: forward_seconds(ours, ids),
                        lambda: forward_seconds(lambda x: theirs(input_ids=x), ids)),
            "decode": (lambda: decode_ours(ours, prompt, steps), lambda: decode_theirs(theirs, prompt, steps))}
    tokens = {"forward": batch * seq_len, "decode": steps}
    times = {(kind, side): [] for kind in runs for side in ("minillama", "transformers")}
    for r in range(rounds + 1):  # round 0 warms up (allocations, thread pools)
        for kind, (mine, reference) in runs.items():
            pairs = [("minillama", mine), ("transformers", reference)]
            for side, run in pairs if r % 2 else pairs[::-1]:
                seconds = run()
                if r:
                    times[kind, side].append(seconds)
        print(f"  round {r}/{rounds} done", file=sys.stderr)
    result = {}
    for kind in runs:
        speed = {side: tokens[kind] / statistics.median(times[kind, side]) for side in ("minillama", "transformers")}
        result[kind] = speed | {"ratio": speed["minillama"] / speed["transformers"]}
    return result


def moe_bench_flags(p) -> None:
    p.add_argument("--dim", type=int, default=512, help="model width C (default 512; heads of 64)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--batch-size", type=int, default=8, help="forward: B (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="forward: T (default 256)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per round (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, median reported (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both (default torch's; 1 = compute alone, without the stalls a busy "
                        "machine causes in every multi-threaded op)")


def moe_bench(args) -> None:
    sizes = (args.dim, args.layers, args.vocab, args.batch_size, args.seq_len, args.steps, args.rounds)
    if args.dim % 256 or min(sizes) < 1 or args.threads is not None and args.threads < 1:
        raise UserError("--dim must be a multiple of 256; the other sizes and --threads positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = bench_shape(args.dim, args.layers, args.vocab)
    result = run_bench(config, args.batch_size, args.seq_len, args.steps, args.rounds)
    print(f"Mixtral shape: dim {config.dim}, {config.n_layers} layers, {config.n_experts} experts of "
          f"{config.ffn_dim} (top {config.experts_per_token}), vocab {config.vocab_size:,}; "
          f"threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    print(f"{'':24} {'minillama':>11} {'transformers':>13} {'ratio':>7}")
    for kind, label in (("forward", f"forward {args.batch_size} x {args.seq_len} tok/s"),
                        ("decode", "decode batch 1 tok/s")):
        r = result[kind]
        print(f"{label:24} {r['minillama']:11,.1f} {r['transformers']:13,.1f} {r['ratio']:6.2f}x")
