"""`minillama lab long-context`: which ways of running a model past its training length work.

Trains two small byte-level models on Shakespeare at T = 128 tokens, one with RoPE and one with ALiBi,
and measures validation perplexity at 1x, 2x, 4x, 8x and 16x that length for direct extrapolation (no
scaling), position interpolation (PI), NTK-aware scaling, dynamic NTK, YaRN, base truncation, ReRoPE,
leaky ReRoPE, ALiBi, and PI after a short fine-tune at the longer length. Then it trains a tiny model
on passkey retrieval (lab/passkey.py) at the same T and measures its accuracy per method and length.

Each method is a config change of the same weights (model/rope.py, model/positions.py); the factor of
the scaling methods is the multiple of T being evaluated, as one would set it for that target length.
The notes' claims (seed 002, 扩展位置编码) it tests: direct extrapolation collapses past the training
length; NTK-aware scaling extrapolates better than PI without fine-tuning; PI needs a little fine-tuning;
ReRoPE keeps perplexity flat.
"""

import math
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minillama.config import ModelConfig, RopeScaling, TrainConfig
from minillama.lab import passkey
from minillama.lab.common import figure, save, table
from minillama.model import Llama

METHODS = ["none", "PI", "NTK", "dynamic NTK", "YaRN", "truncation", "ReRoPE", "leaky ReRoPE"]  # on RoPE weights


@dataclass(frozen=True)
class Plan:
    T: int  # the training length
    multiples: tuple[int, ...]  # evaluated lengths, in multiples of T
    dim: int  # the models' width (4 heads for language, 8 for passkey)
    layers: int
    # budgets in steps, not seconds: a run gives the same numbers on every machine
    train_steps: int  # per language model
    finetune_steps: int  # PI fine-tune at each longer length
    eval_tokens: int  # validation tokens per length
    passkey_steps: int
    passkey_prompts: int  # per method and length


FULL = Plan(T=128, multiples=(1, 2, 4, 8, 16), dim=128, layers=4, train_steps=600, finetune_steps=40,
            eval_tokens=16384, passkey_steps=1000, passkey_prompts=20)
# the pipeline, in about a minute: too short to learn the passkey task, enough to beat uniform bytes
QUICK = Plan(T=64, multiples=(1, 2, 4), dim=64, layers=2, train_steps=60, finetune_steps=4, eval_tokens=1024,
             passkey_steps=10, passkey_prompts=4)


def scaled(config: ModelConfig, method: str, multiple: int, T: int) -> ModelConfig:
    """The config of `method` run at `multiple` x T: the same weights, another way of placing positions."""
    L, w = multiple * T, T // 2
    scaling = {
        "none": None,
        "PI": RopeScaling("linear", multiple),
        "NTK": RopeScaling("ntk", multiple),
        "dynamic NTK": RopeScaling("dynamic", 1.0, original_max_seq_len=T),  # the notes' max(1, length / T)
        "YaRN": RopeScaling("yarn", multiple, original_max_seq_len=T),
        # keep the pairs that turn fully within T, zero those that turn less than a radian in it, and give
        # the ones between a frequency that turns one radian over the whole target length
        "truncation": RopeScaling("truncation", low=1 / T, high=2 * math.pi / T, beta=1 / L),
        "ReRoPE": RopeScaling("rerope", window=w),
        # the notes' leaky form: the longest distance, L, lands on T
        "leaky ReRoPE": RopeScaling("leaky_rerope", (L - w) / (T - w), window=w),
    }[method]
    return config.replace(rope_scaling=scaling)


def with_config(model: Llama, config: ModelConfig) -> Llama:
    """The same weights under another config (the rotary tables are rebuilt from it)."""
    other = Llama(config).eval()
    other.load_state_dict(model.state_dict())
    return other


# ---- data ----

def shakespeare_bytes():
    """(train, val) token ids: the UTF-8 bytes of the plays, the validation plays held out (vocabulary 256)."""
    from minillama.data.corpus import load_corpus, split

    def ids(docs):
        return torch.frombuffer(bytearray("\n\n".join(d.text for d in docs).encode()), dtype=torch.uint8).long()

    train, val = split(load_corpus("shakespeare"))
    return ids(train), ids(val)


def windows(stream, length: int, count: int, rng: random.Random):
    """(count, length + 1) random windows of a 1-D token stream, for training."""
    starts = [rng.randrange(len(stream) - length - 1) for _ in range(count)]
    return torch.stack([stream[s:s + length + 1] for s in starts])


# ---- training and evaluation ----

def train(model: Llama, batch, steps: int, lr: float, bar) -> None:
    """`steps` AdamW updates (warmup, then cosine: the trainer's schedule) on batch(step) -> (B, T+1)."""
    from minillama.train.trainer import Trainer

    trainer = Trainer(model, TrainConfig(corpus=["-"], out="-", lr=lr, warmup_steps=min(10, steps // 5)),
                      total_steps=steps)
    model.train()
    while trainer.step < steps:
        trainer.train_step(batch(trainer.step))
        bar.set_postfix_str(f"step {trainer.step}/{steps}")
    model.eval()


@torch.inference_mode()
def val_perplexity(model: Llama, val, length: int, tokens: int) -> float:
    """exp(mean next-token NLL) over consecutive windows of `length` tokens, every position scored: the same
    first `tokens` of the validation text at every length."""
    count = max(1, tokens // length)
    batch = torch.stack([val[i * length:(i + 1) * length + 1] for i in range(count)])  # (N, length + 1)
    rows = max(1, 8192 // length)
    nll = 0.0
    for i in range(0, count, rows):
        chunk = batch[i:i + rows]
        logits = model(chunk[:, :-1]).float()  # (B, length, V)
        nll += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    return math.exp(nll / (count * length))


def language_model(plan: Plan, encoding: str) -> Llama:
    config = ModelConfig(vocab_size=256, dim=plan.dim, n_layers=plan.layers, n_heads=4, hidden_dim=3 * plan.dim,
                         max_seq_len=plan.T * max(plan.multiples), position_encoding=encoding, bos_token_id=None,
                         eos_token_id=None)
    return Llama(config).init_weights(0)


def perplexity_runs(plan: Plan, bar) -> dict:
    """{method: {multiple: perplexity}}."""
    train_ids, val_ids = shakespeare_bytes()
    rng, T = random.Random(0), plan.T
    results = {}
    for encoding in ("rope", "alibi"):
        bar.set_description(f"train {encoding}")
        model = language_model(plan, encoding)
        train(model, lambda step: windows(train_ids, T, 32, rng), plan.train_steps, 3e-3, bar)
        bar.update(1)
        for method in (METHODS if encoding == "rope" else ["ALiBi"]):
            bar.set_description(f"eval {method}")
            results[method] = {}
            for m in plan.multiples:
                evaluated = model if encoding == "alibi" else with_config(model, scaled(model.config, method, m, T))
                results[method][m] = val_perplexity(evaluated, val_ids, m * T, plan.eval_tokens)
                bar.update(1)
        if encoding == "rope":
            results["PI + fine-tune"] = {1: results["none"][1]}
            for m in plan.multiples[1:]:
                bar.set_description(f"fine-tune PI {m}x")
                tuned = with_config(model, scaled(model.config, "PI", m, T))
                rows = max(1, 32 // m)  # the same tokens per step as pretraining
                train(tuned, lambda step: windows(train_ids, m * T, rows, rng), plan.finetune_steps, 1e-3, bar)
                results["PI + fine-tune"][m] = val_perplexity(tuned, val_ids, m * T, plan.eval_tokens)
                bar.update(1)
    return {"perplexity": results}


def passkey_runs(plan: Plan, bar) -> dict:
    """{method: {multiple: accuracy}} of tiny models trained on passkey retrieval at T."""
    results, T = {}, plan.T
    for encoding in ("rope", "alibi"):
        bar.set_description(f"train passkey {encoding}")
        # two layers (an induction head needs two), a tied head (copying is then the identity map): the
        # retrieval appears abruptly after ~800 steps (Olsson et al.'s phase change)
        config = ModelConfig(vocab_size=len(passkey.WORDS), dim=plan.dim, n_layers=2, n_heads=8, hidden_dim=3 * plan.dim,
                             max_seq_len=T * max(plan.multiples), position_encoding=encoding, tie_embeddings=True,
                             bos_token_id=None, eos_token_id=None)
        model = Llama(config).init_weights(0)
        rng = random.Random(1)
        train(model, lambda step: passkey.training_batch(16, T, rng), plan.passkey_steps, 3e-3, bar)
        bar.update(1)
        for method in (METHODS if encoding == "rope" else ["ALiBi"]):
            bar.set_description(f"passkey {method}")
            results[method] = {}
            for m in plan.multiples:
                evaluated = model if encoding == "alibi" else with_config(model, scaled(config, method, m, T))
                results[method][m] = passkey.accuracy(evaluated, m * T, plan.passkey_prompts)
                bar.update(1)
    return {"passkey": results}


def run(out, quick: bool = False) -> dict:
    from tqdm import tqdm

    plan = QUICK if quick else FULL
    n = len(plan.multiples)
    work = 2 + (len(METHODS) + 1) * n + (n - 1) + 2 + (len(METHODS) + 1) * n
    torch.manual_seed(0)
    start = time.perf_counter()
    with tqdm(total=work, desc="long-context", file=sys.stderr) as bar:
        results = {"plan": plan.__dict__} | perplexity_runs(plan, bar) | passkey_runs(plan, bar)
    results["seconds"] = round(time.perf_counter() - start, 1)
    report(results, plan, out)
    return results


def report(results: dict, plan: Plan, out) -> None:
    T = plan.T
    columns = ["method"] + [f"{m}x ({m * T})" for m in plan.multiples]

    def rows(numbers: dict, fmt):
        return [{"method": method} | {c: fmt(v) for c, v in zip(columns[1:], by_length.values())}
                for method, by_length in numbers.items()]

    print(f"validation perplexity (byte level, trained at T={T}):")
    print(table(rows(results["perplexity"], lambda v: f"{v:.2f}"), columns))
    print(f"\npasskey retrieval accuracy ({plan.passkey_prompts} prompts per cell):")
    print(table(rows(results["passkey"], lambda v: f"{v:.0%}"), columns))
    fig, (left, right) = figure(2)
    for method, by_length in results["perplexity"].items():
        left.plot([m * T for m in by_length], list(by_length.values()), marker="o", label=method)
    for method, by_length in results["passkey"].items():
        right.plot([m * T for m in by_length], list(by_length.values()), marker="o", label=method)
    for ax, title in ((left, "validation perplexity"), (right, "passkey accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"sequence length (trained at {T})")
        ax.set_title(title)
        ax.axvline(T, color="grey", linestyle=":")
    left.set_yscale("log")
    left.legend(fontsize=7)
    save(out, "long-context", results, fig)
