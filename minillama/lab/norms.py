"""Norms: where the norm goes (pre, post, sandwich) and which norm (RMSNorm, LayerNorm).

The notes (002, lines 1106-1193) list three placements: post-norm, Norm(x + Sublayer(x)), "may train
unstably, rarely used alone"; pre-norm, x + Sublayer(Norm(x)), "more stable, mainstream, slightly worse";
sandwich, x + Norm(Sublayer(Norm(x))), "better in theory, still cannot guarantee stable training". 000 (line
36) and 001 (lines 128-132) say RMSNorm drops LayerNorm's re-centering to be cheaper, and "does not change the
direction of the hidden state, only its length". Llama is pre-norm with RMSNorm (model/llama.py, DecoderLayer).

The variants are built here as transforms of a Llama (model -> model), so the model file stays pure Llama:
the blocks are wrapped (PostNorm, SandwichNorm) or every RMSNorm is swapped for a LayerNorm. Each variant
trains on Shakespeare's bytes for the same steps; then pre- and post-norm again at a high learning rate
without warmup (where post-norm is said to fail, Xiong et al. 2020, arXiv:2002.04745); and the forward +
backward time of each norm is measured.
"""

import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from minillama.lab.common import (bits, byte_stream, corpus_texts, figure, one_thread, progress, save, small_llama,
                                  table, train_steps)
from minillama.model import Llama
from minillama.model.llama import RMSNorm

QUICK = dict(train_bytes=200_000, val_bytes=8_000, dim=64, layers=4, seq_len=64, batch=8, steps=25, lr=3e-3,
             high_lr=3e-2, timing_shape=(8, 64, 256), timing_repeats=10)
FULL = dict(train_bytes=2_000_000, val_bytes=100_000, dim=96, layers=6, seq_len=64, batch=16, steps=400, lr=3e-3,
            high_lr=3e-2, timing_shape=(16, 256, 512), timing_repeats=50)


class PostNorm(nn.Module):
    """Post-norm (the original Transformer, Vaswani et al. 2017): each sublayer's sum is normalised,
    x = Norm(x + Sublayer(x)), so the residual stream itself passes through every norm."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, rope, mask, cache=None, i=0, router_logits=None):
        block = self.layer
        x = block.input_layernorm(x + block.self_attn(x, rope, mask, cache, i))
        return block.post_attention_layernorm(x + block.mlp(x))


class SandwichNorm(nn.Module):
    """Sandwich norm (Ding et al. 2021, CogView, arXiv:2105.13290): x + Norm(Sublayer(Norm(x))), one more
    norm on each sublayer's output before it joins the residual stream."""

    def __init__(self, layer, dim: int, eps: float):
        super().__init__()
        self.layer = layer
        self.attn_out_norm, self.mlp_out_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, rope, mask, cache=None, i=0, router_logits=None):
        block = self.layer
        x = x + self.attn_out_norm(block.self_attn(block.input_layernorm(x), rope, mask, cache, i))
        return x + self.mlp_out_norm(block.mlp(block.post_attention_layernorm(x)))


def with_blocks(model: Llama, wrap) -> Llama:
    """model -> model: every decoder block replaced by wrap(block) (same weights, another wiring)."""
    model.model.layers = nn.ModuleList(wrap(layer) for layer in model.layers)
    return model


def with_layernorm(model: Llama) -> Llama:
    """model -> model: every RMSNorm (the blocks' and the final one, and a sandwich's) becomes a LayerNorm."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, RMSNorm):
                setattr(module, name, nn.LayerNorm(child.weight.shape[0], eps=child.eps))
    return model


def variant(base: Llama, placement: str, norm: str) -> Llama:
    """A copy of `base` (same initial weights) wired as `placement` (pre, post, sandwich) with `norm`."""
    model = copy.deepcopy(base)
    c = model.config
    if placement == "post":
        model = with_blocks(model, PostNorm)
    elif placement == "sandwich":
        model = with_blocks(model, lambda layer: SandwichNorm(layer, c.dim, c.norm_eps))
    return with_layernorm(model) if norm == "LayerNorm" else model


def direction_check(dim: int = 512) -> list[dict]:
    """Cosine between x and Norm(x) at initialisation (gain 1, bias 0): RMSNorm only rescales x (cosine 1);
    LayerNorm also subtracts the mean, which turns it."""
    x = torch.randn(1000, dim, generator=torch.Generator().manual_seed(0)) + 0.5  # activations with a mean
    rows = []
    for name, norm in (("RMSNorm", RMSNorm(dim, 1e-5)), ("LayerNorm", nn.LayerNorm(dim))):
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(x, norm(x), dim=-1)
        rows.append({"norm": name, "min cosine(x, norm(x))": float(cosine.min()), "mean": float(cosine.mean())})
    return rows


def norm_timing(shape, repeats: int) -> list[dict]:
    """Median forward + backward time of each norm on a (B, T, C) activation."""
    B, T, C = shape
    x = torch.randn(B, T, C, requires_grad=True)
    norms = {"RMSNorm (minillama)": RMSNorm(C, 1e-5), "LayerNorm (torch)": nn.LayerNorm(C),
             "RMSNorm (torch.nn)": nn.RMSNorm(C, eps=1e-5)}
    rows = []
    for name, norm in norms.items():
        times = []
        for _ in range(repeats + 3):
            start = time.perf_counter()
            norm(x).sum().backward()
            times.append(time.perf_counter() - start)
        median = sorted(times[3:])[repeats // 2]
        rows.append({"norm": name, "shape": "x".join(map(str, shape)), "fwd+bwd ms": median * 1e3})
    return rows


def unigram_bits(train_ids, val_ids) -> float:
    """Bits per byte of counting bytes (add-one smoothed): a model no better than this learned nothing of
    context."""
    counts = torch.bincount(train_ids, minlength=256).double() + 1
    return float(-(counts / counts.sum()).log2()[val_ids].mean())


def train_variants(c: dict, runs: list[tuple], train_ids, val_ids, bar) -> list[dict]:
    base = small_llama(256, c["dim"], c["layers"], c["seq_len"])
    results = []
    for placement, norm, lr, warmup in runs:
        model = variant(base, placement, norm)
        history = train_steps(model, train_ids, c["steps"], batch_size=c["batch"], seq_len=c["seq_len"], lr=lr,
                              warmup_steps=warmup, bar=bar)
        diverged = bool(history[-1].get("diverged"))
        val = float("nan") if diverged else bits(model, val_ids, c["seq_len"])["bits_per_token"]
        results.append({"placement": placement, "norm": norm, "lr": lr, "warmup": warmup, "diverged": diverged,
                        "final train loss": history[-1]["loss"], "val bits/byte": val,
                        "learned": not diverged and val < unigram_bits(train_ids, val_ids) - 0.05, "history": history})
    return results


def draw(equal: list[dict], high: list[dict], timing: list[dict]):
    fig, (ax1, ax2, ax3) = figure(3, width=5.0)
    for ax, runs in ((ax1, equal), (ax2, high)):
        for r in runs:
            steps = [h["step"] for h in r["history"]]
            ax.plot(steps, [h["loss"] / math.log(2) for h in r["history"]], label=f"{r['placement']} {r['norm']}")
        ax.set(xlabel="step", ylabel="training loss (bits/byte)")
        ax.legend(fontsize=8)
    ax1.set_title(f"same budget, lr {equal[0]['lr']:g} with warmup")
    ax2.set_title(f"lr {high[0]['lr']:g}, no warmup")
    ax3.barh([t["norm"] for t in timing], [t["fwd+bwd ms"] for t in timing])
    ax3.set(xlabel="ms (median)", title=f"forward + backward, {timing[0]['shape']}")
    return fig


def summary(c: dict, equal: list[dict], high: list[dict], unigram: float, direction: list[dict]) -> str:
    def outcome(r):
        if r["diverged"]:
            return "diverged"
        return f"{'learned' if r['learned'] else 'learned nothing beyond byte counts'} ({r['val bits/byte']:.3f})"

    best = min(equal, key=lambda r: r["val bits/byte"])
    pre_high, post_high = high
    rms, layer = (d["min cosine(x, norm(x))"] for d in direction)
    return (f"same budget: best {best['placement']}-{best['norm']} ({best['val bits/byte']:.3f} bits/byte; counting "
            f"bytes gives {unigram:.3f}); at lr {c['high_lr']:g} without warmup pre-norm {outcome(pre_high)}, "
            f"post-norm {outcome(post_high)}; RMSNorm keeps the direction (min cosine {rms:.6f}), LayerNorm turns it "
            f"(min cosine {layer:.3f})")


def run(out: Path, quick: bool = False) -> dict:
    c = QUICK if quick else FULL
    warmup = max(1, c["steps"] // 10)
    equal_runs = [("pre", "RMSNorm", c["lr"], warmup), ("post", "RMSNorm", c["lr"], warmup),
                  ("sandwich", "RMSNorm", c["lr"], warmup), ("pre", "LayerNorm", c["lr"], warmup)]
    high_runs = [("pre", "RMSNorm", c["high_lr"], 0), ("post", "RMSNorm", c["high_lr"], 0)]
    bar = progress(c["steps"] * (len(equal_runs) + len(high_runs)), "norms")
    train_texts, val_texts = corpus_texts("shakespeare", c["train_bytes"], c["val_bytes"])
    train_ids, val_ids = byte_stream(train_texts), byte_stream(val_texts)
    equal = train_variants(c, equal_runs, train_ids, val_ids, bar)
    high = train_variants(c, high_runs, train_ids, val_ids, bar)
    bar.close()
    with one_thread():  # as the models trained
        timing, direction = norm_timing(c["timing_shape"], c["timing_repeats"]), direction_check()
    rows = [{k: v for k, v in r.items() if k != "history"} for r in equal + high]
    tables = [table(rows), table(timing), table(direction)]
    print("\n\n".join(tables))
    unigram = unigram_bits(train_ids, val_ids)
    verdict = summary(c, equal, high, unigram, direction)
    print(verdict)
    results = {"config": c, "unigram bits/byte": unigram, "equal_budget": equal, "high_lr": high, "timing": timing,
               "direction": direction, "verdict": verdict, "tables": tables}
    save(out, "norms", results, draw(equal, high, timing))
    return results
