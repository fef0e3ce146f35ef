"""`minillama quickstart`: the whole pipeline in one command, within a time budget (default 8 minutes).

corpus (shakespeare) -> SentencePiece tokenizer -> token shards -> a one-million-parameter Llama trained
with train.train() -> a sampled continuation -> validation perplexity of the model against the
baseline it has to beat: a Kneser-Ney n-gram model (ngram.py) counted on the same training tokens.

The comparison is made on the same tokens: the whole validation stream (BOS, play, EOS, ...) is scored
once by each, every token but the first, the model by sliding windows of its context with half-window
stride (evaluate.perplexity, so every prediction sees at least T/2 tokens), the n-gram from its last
n-1 tokens. The n-gram's order is the best of 2..5 on that very stream, which flatters the baseline.
The command exits 1 when the model loses.
"""

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from minillama.config import UserError

MARKER = "quickstart.json"  # a folder holding this was written by quickstart and may be replaced

# The default shape, from measurements on 2 cores (bfloat16, vocabulary 2048, batch 16 x 256). Widths
# 128, 192 and 256 (4 layers) train at ~15k, ~12k and ~9k tokens/s and learn about equally much per token
# at this scale, so the narrowest sees the most text in the time and ends best. Scored as below (n-gram
# 34.5): width 256 after 3.0M tokens 34.1; width 192 after 2.25M 41.0, after 4.5M 30.8; width 128 (1.1M
# weights) after 6.4M tokens (3.4 epochs, ~7 minutes) 29.1.
DEFAULTS = {"corpus": "shakespeare", "vocab_size": 2048, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": None,
            "hidden_dim": 384, "seq_len": 256, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20}


def quickstart(out: str = "runs/quickstart", time_budget: str = "8m", *, corpus: str = DEFAULTS["corpus"],
               vocab_size: int = DEFAULTS["vocab_size"], preset: str | None = None, dim: int = DEFAULTS["dim"],
               n_layers: int = DEFAULTS["n_layers"], n_heads: int = DEFAULTS["n_heads"],
               n_kv_heads: int | None = None, hidden_dim: int | None = DEFAULTS["hidden_dim"],
               seq_len: int = DEFAULTS["seq_len"], batch_size: int = DEFAULTS["batch_size"],
               lr: float = DEFAULTS["lr"], warmup_steps: int = DEFAULTS["warmup_steps"],
               dtype: str = "bfloat16", compile: bool = False, ngram_orders: tuple[int, ...] = (2, 3, 4, 5),
               prompt: str = "ROMEO.\n", sample_tokens: int = 200, seed: int = 1337) -> dict:
    """Train, sample, compare; print as it goes and return the summary also written to RUN/quickstart.json.
    time_budget is the whole command's wall time; training gets what the other stages leave."""
    from minillama.train import TrainConfig, parse_duration, train

    start = time.perf_counter()
    training = _training_seconds(parse_duration(time_budget))  # a bad budget fails before any work
    run = _fresh_run_folder(Path(out))
    if preset is None:  # our own shape: a config file of ModelConfig fields (vocab and T come from train)
        shape = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
                 "hidden_dim": hidden_dim, "tie_embeddings": True}
        (run / "model.json").write_text(json.dumps(shape, indent=1) + "\n")
    config = TrainConfig(corpus=[corpus], out=str(run), preset=preset,
                         config=None if preset else str(run / "model.json"), vocab_size=vocab_size,
                         seq_len=seq_len, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                         time_budget=f"{training:.0f}s", eval_every=100, eval_steps=4,
                         seed=seed, dtype=dtype, compile=compile)
    config.check()
    print(f"quickstart: {corpus}, budget {time_budget} ({config.time_budget} of training), writing {run}",
          file=sys.stderr)
    result = train(config)
    summary = {"config": dataclasses.asdict(config), "steps": result.steps, "train_loss": result.loss,
               "train_tokens_per_s": result.tokens_per_s}
    summary |= compare(run, result.checkpoint, seq_len, ngram_orders)
    summary["sample"] = sample(result.checkpoint, prompt, sample_tokens, seed)
    summary["seconds"] = time.perf_counter() - start
    _write_summary(run, summary)
    return summary


def _training_seconds(budget: float) -> float:
    """The training loop's share of the budget. The rest: tokenizer training and pretokenization
    (~10 s for Shakespeare), scoring the validation stream twice, counting n-grams and sampling
    (~30-40 s at the default size), with headroom on a busy machine."""
    reserve = min(90.0, max(8.0, 0.15 * budget))
    if budget - reserve < 5:
        raise UserError(f"--time-budget {budget:.0f}s leaves no time to train: give at least {reserve + 5:.0f}s")
    return budget - reserve


def _fresh_run_folder(run: Path) -> Path:
    """An empty folder, or a previous quickstart's folder emptied (so `make demo` can run twice);
    anything else already there is the user's, and we refuse to touch it."""
    if run.exists() and any(run.iterdir()):
        if not (run / MARKER).exists():
            raise UserError(f"--out {run}: the folder exists and was not written by quickstart; choose "
                            "another --out or remove it")
        print(f"note: replacing the previous quickstart run in {run}", file=sys.stderr)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / MARKER).write_text("{}\n")  # claimed at once, so an interrupted run can be replaced too
    return run


def compare(run: Path, checkpoint: Path, seq_len: int, ngram_orders) -> dict:
    """Validation perplexity of the trained model and of n-gram models fitted on the same training tokens,
    over the same validation tokens (every token of RUN/data/val but the first)."""
    from minillama.checkpoint import load_model
    from minillama.data import TokenShards
    from minillama.evaluate import perplexity
    from minillama.ngram import NGramLM

    train_ids, val_ids = TokenShards(run / "data" / "train").tokens(), TokenShards(run / "data" / "val").tokens()
    model = load_model(checkpoint).eval()
    print(f"scoring {len(val_ids):,} validation tokens with the model ...", file=sys.stderr)
    scored = perplexity(model, torch.from_numpy(val_ids.astype("int64")), context=seq_len,
                        stride=max(1, seq_len // 2), batch_size=16, progress=True)
    vocab = model.config.vocab_size
    usable = [n for n in ngram_orders if (vocab + 1) ** n < 2**63]  # int64 n-gram keys (ngram.py)
    ngrams = {}
    for n in usable:
        print(f"counting {n}-grams of {len(train_ids):,} training tokens ...", file=sys.stderr)
        r = NGramLM(n, vocab, "kn").fit(train_ids).perplexity(val_ids)
        if r["tokens"] != scored["tokens"]:
            raise RuntimeError(f"the n-gram scored {r['tokens']} tokens, the model {scored['tokens']}")
        ngrams[n] = r["perplexity"]
    best = min(ngrams, key=ngrams.get)
    return {"params": sum(p.numel() for p in model.parameters()), "val_tokens": scored["tokens"],
            "model_perplexity": scored["perplexity"], "ngram_perplexity": ngrams[best], "ngram_order": best,
            "ngram_perplexities": ngrams, "model_wins": scored["perplexity"] < ngrams[best]}


def sample(checkpoint: Path, prompt: str, max_new_tokens: int, seed: int) -> str:
    """A seeded continuation of the prompt from the trained model (generate.generate)."""
    from minillama.generate import GenerationConfig, generate, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(checkpoint))
    params = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=seed)
    [completion], _ = generate(model, tokenizer, [prompt], params)
    return prompt + completion.text


def _write_summary(run: Path, summary: dict) -> None:
    tmp = run / (MARKER + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(run / MARKER)


def print_summary(s: dict, run: Path) -> None:
    print("\n---- sample (temperature 0.8, top-k 50, top-p 0.95) ----")
    print(s["sample"])
    print("----")
    orders = ", ".join(f"{n}-gram {p:.2f}" for n, p in s["ngram_perplexities"].items())
    print(f"validation perplexity over the same {s['val_tokens']:,} tokens:")
    print(f"  model   {s['model_perplexity']:8.2f}   ({s['params'] / 1e6:.1f}M parameters, {s['steps']} steps, "
          f"{s['train_tokens_per_s'] / 1e3:.1f}k tokens/s)")
    print(f"  n-gram  {s['ngram_perplexity']:8.2f}   (Kneser-Ney {s['ngram_order']}-gram, the best of: {orders})")
    ratio = s["model_perplexity"] / s["ngram_perplexity"]
    verdict = "the model wins" if s["model_wins"] else "the n-gram wins: train longer (--time-budget) or retune"
    print(f"{verdict} (model / n-gram perplexity = {ratio:.3f}, {math.log(ratio):+.3f} nats per token)")
    minutes, seconds = divmod(round(s["seconds"]), 60)
    print(f"total wall time {minutes}m{seconds:02d}s; loss curve {run / 'loss.png'}, "
          f"model {run / 'final'}")


def run_quickstart(args) -> int:
    s = quickstart(args.out, args.time_budget, corpus=args.corpus, vocab_size=args.vocab_size, preset=args.preset,
                   dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                   hidden_dim=args.hidden_dim, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                   warmup_steps=args.warmup_steps, dtype=args.dtype, compile=args.compile,
                   ngram_orders=tuple(args.ngram_orders), prompt=args.prompt, sample_tokens=args.sample_tokens,
                   seed=args.seed)
    print_summary(s, Path(args.out))
    return 0 if s["model_wins"] else 1


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="train a small model on Shakespeare, sample it, beat an n-gram",
                              description="Tokenizer, data, training, a sample and the validation perplexity of "
                                          "the model against a Kneser-Ney n-gram baseline, within a time budget. "
                                          "Exits 1 if the model does not beat the baseline.")
    p.add_argument("--out", default="runs/quickstart", metavar="RUN", help="run folder (default runs/quickstart)")
    p.add_argument("--time-budget", default="8m", help="wall time of the whole command (default 8m)")
    p.add_argument("--corpus", default=DEFAULTS["corpus"], metavar="SPEC", help="default shakespeare")
    p.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"], help="tokenizer size (default 2048)")
    p.add_argument("--preset", default=None, help="a named model shape instead of --dim ... (e.g. tiny)")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "seq_len", "batch_size", "warmup_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=DEFAULTS[name],
                       help=f"default {DEFAULTS[name]}")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help=f"peak learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="training precision (default bfloat16 autocast; float32 where the CPU lacks bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--ngram-orders", type=int, nargs="+", default=[2, 3, 4, 5], metavar="N",
                   help="n-gram orders to fit; the best is the baseline (default 2 3 4 5)")
    p.add_argument("--prompt", default="ROMEO.\n", help="the sample's prompt")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens to sample (default 200)")
    p.add_argument("--seed", type=int, default=1337, help="weights, data order and sampling")
    p.set_defaults(run=run_quickstart)
