"""Attention scaling: why the scores are divided by √D.

The notes (002, line 778; 004, line 282) give softmax(Q·Kᵀ/√D)·V and the reason from the paper: for large D
the dot products grow, the softmax saturates and its gradients become tiny, so scaling keeps them stable.
With q and k of unit-variance entries, q·k has variance D: dividing by √D brings it back to 1. Here:
1. random unit-variance q, k for several head dims: the scores' spread, the attention entropy and the size
   of the softmax's gradient, with and without the scaling;
2. a small Llama and the same model without the scaling, from the same initial weights: attention entropy at
   initialisation, then training on Shakespeare's bytes (loss and gradient norm), and the entropy after.
The unscaled model is a transform (model -> model): a hook multiplies q_proj's output by √D, which the
attention's own 1/√D cancels (model/llama.py stays as it is; RoPE is linear, so scaling before it is the same).
"""

import copy
import math
from pathlib import Path

import torch

from minillama.lab.common import (attention_weights, bits, byte_stream, corpus_texts, entropy_bits, figure, one_thread,
                                  progress, save, small_llama, table, train_steps)
from minillama.model import Llama

QUICK = dict(train_bytes=200_000, val_bytes=8_000, dim=64, heads=2, layers=2, seq_len=64, batch=8, steps=25, lr=3e-3,
             head_dims=(16, 64, 256))
FULL = dict(train_bytes=2_000_000, val_bytes=100_000, dim=128, heads=2, layers=4, seq_len=64, batch=16, steps=400,
            lr=3e-3, head_dims=(16, 64, 128, 256, 1024, 4096))


def without_scaling(model: Llama) -> Llama:
    """model -> model whose attention scores are q·kᵀ, not q·kᵀ/√D."""
    for layer in model.layers:
        scale = math.sqrt(layer.self_attn.head_dim)
        layer.self_attn.q_proj.register_forward_hook(lambda module, inputs, q, scale=scale: q * scale)
    return model


def synthetic(head_dims, T: int = 128) -> list[dict]:
    """Unit-variance q, k (T queries, T keys, no mask): what the scaling does to the softmax."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for D in head_dims:
        q, k = torch.randn(T, D, generator=generator), torch.randn(T, D, generator=generator)
        upstream = torch.randn(T, T, generator=generator)  # some gradient arriving at the weights
        for scaled in (True, False):
            scores = (q @ k.T / (math.sqrt(D) if scaled else 1.0)).requires_grad_()  # (T, T)
            weights = scores.softmax(-1)
            (weights * upstream).sum().backward()
            top = weights.detach().max(-1).values  # (T,)
            rows.append({"D": D, "scaled": scaled, "score std": float(scores.detach().std()),
                         "entropy bits": float(entropy_bits(weights.detach()).mean()), "max entropy": math.log2(T),
                         "mean top weight": float(top.mean()), "rows saturated": float((top > 0.99).float().mean()),
                         "grad norm at scores": float(scores.grad.norm())})
    return rows


def mean_entropy(model, ids) -> float:
    with one_thread():
        return float(torch.stack([entropy_bits(w).mean() for w in attention_weights(model, ids)]).mean())


def train_pair(c: dict, train_ids, val_ids, bar) -> list[dict]:
    base = small_llama(256, c["dim"], c["layers"], c["seq_len"], heads=c["heads"])
    probe = val_ids[:c["seq_len"]][None]  # (1, T) a validation window for the entropy
    runs = []
    for scaled in (True, False):
        model = copy.deepcopy(base) if scaled else without_scaling(copy.deepcopy(base))
        at_init = mean_entropy(model, probe)
        history = train_steps(model, train_ids, c["steps"], batch_size=c["batch"], seq_len=c["seq_len"], lr=c["lr"],
                              bar=bar)
        diverged = bool(history[-1].get("diverged"))
        nan = float("nan")
        runs.append({"scaled": scaled, "head dim": base.config.head_dim, "entropy at init": at_init,
                     "entropy trained": nan if diverged else mean_entropy(model, probe),
                     "max entropy (T keys)": math.log2(c["seq_len"]), "diverged": diverged,
                     "mean grad norm": sum(h.get("grad_norm", 0.0) for h in history) / len(history),
                     "val bits/byte": nan if diverged else bits(model, val_ids, c["seq_len"])["bits_per_token"],
                     "history": history})
    return runs


def draw(syn: list[dict], runs: list[dict]):
    fig, (ax1, ax2, ax3) = figure(3, width=5.0)
    saturated = ax1.twinx()
    for scaled, color in ((True, "tab:blue"), (False, "tab:orange")):
        rows = [r for r in syn if r["scaled"] == scaled]
        label = "q·k/√D" if scaled else "q·k"
        dims = [r["D"] for r in rows]
        ax1.plot(dims, [r["entropy bits"] for r in rows], "-o", color=color, label=f"entropy, {label}")
        saturated.plot(dims, [r["rows saturated"] for r in rows], ":s", color=color,
                       label=f"rows saturated, {label}")
    ax1.set_xscale("log")
    ax1.set(xlabel="head dim D", ylabel="attention entropy (bits)",
            title=f"unit-variance q, k, {syn[0]['max entropy']:.0f} bits = uniform")
    saturated.set(ylabel="rows with top weight > 0.99 (dotted)", ylim=(-0.02, 1.02))
    ax1.legend(fontsize=7, loc="center left")
    for r in runs:
        label = "q·k/√D" if r["scaled"] else "q·k (no scaling)"
        steps = [h["step"] for h in r["history"]]
        ax2.plot(steps, [h["loss"] / math.log(2) for h in r["history"]], label=label)
        ax3.plot(steps, [h.get("grad_norm", float("nan")) for h in r["history"]], label=label)
    ax2.set(xlabel="step", ylabel="training loss (bits/byte)", title=f"small Llama, D = {runs[0]['head dim']}")
    ax3.set(xlabel="step", ylabel="gradient norm (before clipping)", title="gradient norm")
    ax3.set_yscale("log")
    ax2.legend()
    ax3.legend()
    fig.tight_layout()
    return fig


def run(out: Path, quick: bool = False) -> dict:
    c = QUICK if quick else FULL
    bar = progress(2 * c["steps"], "attention-scale")
    syn = synthetic(c["head_dims"])
    train_texts, val_texts = corpus_texts("shakespeare", c["train_bytes"], c["val_bytes"])
    runs = train_pair(c, byte_stream(train_texts), byte_stream(val_texts), bar)
    bar.close()
    tables = [table(syn), table([{k: v for k, v in r.items() if k != "history"} for r in runs])]
    print("\n\n".join(tables))
    big = max(c["head_dims"])
    s, u = (next(r for r in syn if r["D"] == big and r["scaled"] == flag) for flag in (True, False))
    scaled_run, plain_run = runs
    verdict = (f"at D = {big} without scaling the scores spread {u['score std']:.1f} (scaled: {s['score std']:.2f}), "
               f"the softmax's entropy falls to {u['entropy bits']:.2f} bits (scaled: {s['entropy bits']:.2f}) and "
               f"{u['rows saturated']:.0%} of its rows are saturated (top weight > 0.99, gradient ≈ 0; scaled: "
               f"{s['rows saturated']:.0%}); trained: val {scaled_run['val bits/byte']:.3f} (scaled) vs "
               f"{plain_run['val bits/byte']:.3f} bits/byte (unscaled)")
    print(verdict)
    results = {"config": c, "synthetic": syn, "training": runs, "verdict": verdict, "tables": tables}
    save(out, "attention-scale", results, draw(syn, runs))
    return results
