"""`minillama bench generate`: decode and prefill speed against transformers, on the same weights.

For each model (the stories15M and stories110M shapes with random weights, SmolLM2-135M dequantized from
its GGUF) and each contender (transformers' LlamaForCausalLM.generate; our generator on the plain model,
with the fp32 decode kernel, in bf16, with int8 weights) it measures

  decode tok/s at batch 1 and 8: greedy, a fixed number of new tokens (transformers gets
      min_new_tokens = max_new_tokens), timed from the first new token to the last, so prefill is out;
  prefill tok/s: a 512-token prompt, timed to the first new token;

and divides by transformers' figures. Decoding reads every weight once per step, so its ceiling is
memory bandwidth: `% bw` = (weight bytes read per step × steps/s) / the bandwidth measured in this run
(a 2-thread sum over 512 MB). The machine is shared, so contenders alternate within each round, the
table shows medians over rounds, and `busy` is how much of the CPU other processes used meanwhile.
"""

import copy
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from minillama.bench.common import CpuMeter, hf_twin, import_transformers
from minillama.config import UserError, preset

MODELS = ("stories15M", "stories110M", "smollm2")
CONTENDERS = ("transformers", "minillama", "fast", "compiled", "bf16", "int8")
HELP = {"transformers": "transformers LlamaForCausalLM.generate, fp32", "minillama": "our generator, fp32",
        "fast": "+ apply_fast_linear (fp32 decode kernel)", "compiled": "+ apply_fast_linear + apply_compile",
        "bf16": "+ apply_bf16", "int8": "+ apply_int8 (weights int8, activations bf16 in matmuls)"}


def measure_bandwidth(megabytes: int = 512) -> float:
    """Bytes/s that torch's threads read with a sum over a buffer far larger than the caches (best of 5)."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- models and contenders ----

def base_model(name: str):
    """fp32 Llama of a named shape: random weights (init_weights) for the stories shapes, SmolLM2's GGUF."""
    if name == "smollm2":
        from minillama.checkpoint import load_model
        from minillama.data.assets import smollm2_gguf

        return load_model(smollm2_gguf()).eval()
    from minillama.model import Llama

    # a context long enough for the 512-token prefill; max_seq_len changes no weight
    config = preset(name).replace(max_seq_len=max(preset(name).max_seq_len, 1024))
    return Llama(config).init_weights(seed=0).eval()


def make_contender(name: str, base):
    from minillama.perf.compile import apply_compile
    from minillama.perf.gemv import apply_fast_linear
    from minillama.perf.quantize import apply_bf16, apply_int8

    if name == "transformers":
        return hf_twin(base)
    build = {"minillama": lambda m: m, "fast": apply_fast_linear, "bf16": apply_bf16, "int8": apply_int8,
             "compiled": lambda m: apply_compile(apply_fast_linear(m))}
    return build[name](base if name == "minillama" else copy.deepcopy(base))


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every matmul's weights (an embedding lookup reads one row: ignored)."""
    from minillama.perf.quantize import Int8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, Int8Linear):
            total += m.qweight.numel() + m.scale.numel() * m.scale.element_size()
    return total


# ---- one measurement: returns the wall times of the prefill and of each new token ----

def token_times(contender, model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """Generate `new_tokens` greedily for the prompts; (seconds to the first new token, [time stamp of
    each new token]). Both generators are timed the same way, at the moment each token exists."""
    start = time.perf_counter()
    if contender == "transformers":
        transformers = import_transformers()

        stamps = []

        class Stamp(transformers.LogitsProcessor):  # called once per step, right after the forward
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor(prompts)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, pad_token_id=0,
                           min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=transformers.LogitsProcessorList([Stamp()]))
    else:
        from minillama.config import GenerationConfig
        from minillama.infer.generate import generate_ids

        config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        stamps = [time.perf_counter() for _ in generate_ids(model, prompts, config)]
    if len(stamps) != new_tokens:
        raise RuntimeError(f"{contender} generated {len(stamps)} tokens, not {new_tokens}")
    return stamps[0] - start, stamps


def measure(contender, model, vocab: int, batch: int, new_tokens: int, prompt_len: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()
    with CpuMeter() as meter:
        first, stamps = token_times(contender, model, prompts, new_tokens)
    steps_per_s = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {"prefill": batch * prompt_len / first, "decode": batch * steps_per_s, "steps_per_s": steps_per_s,
            "others": meter.others}


# ---- the run ----

def run_bench(models=MODELS, contenders=CONTENDERS, rounds: int = 3, new_tokens: int = 32,
              prefill_tokens: int = 512, batch: int = 8, progress: bool = True) -> list[dict]:
    """One row per (model, contender): medians over rounds. Contenders alternate within each round."""
    from tqdm import tqdm

    rows = []
    for name in models:
        base = base_model(name)
        built = {c: make_contender(c, base) for c in contenders}
        results = {c: [] for c in contenders}
        bandwidths = []
        tasks = [(r, c) for r in range(rounds) for c in contenders]
        for r, c in tqdm(tasks, desc=f"bench {name}", disable=not progress, file=sys.stderr):
            if c == contenders[0]:
                bandwidths.append(measure_bandwidth())
            vocab = base.config.vocab_size
            if r == 0:  # warm-up of every shape measured (and compilation, for `compiled`), untimed
                for b, n, length in ((1, 3, 16), (batch, 3, 16), (1, 2, prefill_tokens)):
                    measure(c, built[c], vocab, b, n, length, seed=99)
            results[c].append({
                "b1": measure(c, built[c], vocab, 1, new_tokens, 16, seed=r),
                f"b{batch}": measure(c, built[c], vocab, batch, new_tokens, 16, seed=r),
                "prefill": measure(c, built[c], vocab, 1, 2, prefill_tokens, seed=r),
            })
        bandwidth = statistics.median(bandwidths)
        for c in contenders:
            rows.append(summarize(name, c, results[c], weight_bytes(built[c]), bandwidth, batch))
        del built, base
        # compiled code is cached per function, not per model: without a reset the next model's shapes
        # would pile recompilations onto this one's until torch gives up and runs it eagerly
        torch._dynamo.reset()
    reference = {row["model"]: row for row in rows if row["contender"] == "transformers"}
    for row in rows:
        ref = reference.get(row["model"])
        for key in ("decode_b1", f"decode_b{batch}", "prefill"):
            row[key + "_ratio"] = row[key] / ref[key] if ref else None
    return rows


def summarize(model: str, contender: str, results: list[dict], nbytes: int, bandwidth: float, batch: int):
    med = lambda part, key: statistics.median(r[part][key] for r in results)  # noqa: E731
    steps_b1 = med("b1", "steps_per_s")
    return {
        "model": model, "contender": contender, "weight_mb": nbytes / 1e6, "bandwidth_gbs": bandwidth / 1e9,
        "decode_b1": med("b1", "decode"), f"decode_b{batch}": med(f"b{batch}", "decode"),
        "prefill": med("prefill", "prefill"),
        "bandwidth_fraction": steps_b1 * nbytes / bandwidth,  # of the limit, at batch 1
        "others_cpu": statistics.median([r[p]["others"] or 0.0 for r in results for p in r]),
        "rounds": len(results),
    }


def format_table(rows: list[dict], batch: int) -> str:
    head = (f"{'model':<12} {'contender':<13} {'weights':>8} | {'decode b1':>9} {'ratio':>6} {'% bw':>5} | "
            f"{'decode b' + str(batch):>10} {'ratio':>6} | {'prefill':>8} {'ratio':>6} | {'busy':>5}")
    lines = [head, "-" * len(head)]
    ratio = lambda r: f"{r:5.2f}x" if r is not None else "     -"  # noqa: E731
    for r in rows:
        lines.append(
            f"{r['model']:<12} {r['contender']:<13} {r['weight_mb']:6.0f}MB | {r['decode_b1']:9.1f} "
            f"{ratio(r['decode_b1_ratio'])} {100 * r['bandwidth_fraction']:4.0f}% | "
            f"{r[f'decode_b{batch}']:10.1f} {ratio(r[f'decode_b{batch}_ratio'])} | {r['prefill']:8.1f} "
            f"{ratio(r['prefill_ratio'])} | {100 * r['others_cpu']:4.0f}%")
    bandwidths = sorted({f"{r['model']} {r['bandwidth_gbs']:.1f}" for r in rows})
    lines += ["", "tok/s, medians over rounds; ratio = / transformers on the same weights; % bw = weight bytes "
              "per step x steps/s / measured bandwidth (GB/s: " + ", ".join(bandwidths) + "); busy = share "
              "of the CPUs other processes used meanwhile"]
    lines += [f"  {name}: {HELP[name]}" for name in dict.fromkeys(r["contender"] for r in rows)]
    return "\n".join(lines)


def generate_bench(args) -> None:
    models = args.models.split(",") if args.models else list(MODELS)
    contenders = args.contenders.split(",") if args.contenders else list(CONTENDERS)
    for m in models:
        if m not in MODELS:
            raise UserError(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    for c in contenders:
        if c not in HELP:
            raise UserError(f"--contenders: unknown contender {c!r}; choose from {', '.join(HELP)}")
    if args.quick:
        args.rounds, args.new_tokens, args.prefill_tokens = 1, min(args.new_tokens, 12), min(args.prefill_tokens, 128)
    if args.new_tokens < 2 or args.rounds < 1 or args.prefill_tokens < 1:
        raise UserError("--new-tokens must be >= 2 and --rounds, --prefill-tokens >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: use 1 or more")
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()} | cpus {os.cpu_count()} | rounds {args.rounds} | "
          f"{args.new_tokens} new tokens | prefill {args.prefill_tokens}", file=sys.stderr)
    rows = run_bench(models, contenders, args.rounds, args.new_tokens, args.prefill_tokens, args.batch)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows, args.batch))


def generate_bench_flags(p) -> None:
    p.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--contenders", help=f"comma-separated subset of {','.join(HELP)} "
                                        f"(default: {','.join(CONTENDERS)}); transformers is the reference")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported (default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode measurement")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill measurement")
    p.add_argument("--batch", type=int, default=8, help="the batched decode measurement's batch size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for every contender and the bandwidth probe (default: torch's, = cores)")
    p.add_argument("--quick", action="store_true", help="1 round, 12 new tokens, 128-token prefill")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
