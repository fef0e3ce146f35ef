"""Entropy and perplexity: perplexity = 2^(cross-entropy in bits), for n-gram models and a trained Llama.

The notes (002, lines 102-165 and 351-470) define entropy and cross-entropy in bits, perplexity as the
geometric mean exp(-1/L Σ log p) = 2^(bits per token), and call a uniform model's perplexity "very high" (line
370: it is the vocabulary size); they describe n-gram models with smoothing (lines 180-262), say a neural model
beats n-grams on the same data (line 271), and that mixing a fraction ε of garbage into a model raises its
perplexity by at most 1/(1-ε), "only 5% for ε = 5%" (lines 419-432).
This experiment checks the worked examples exactly, then scores one validation text with a uniform model, the
Kneser-Ney n-gram models of orders 1-5 (evaluate/ngram.py) and a small Llama trained here (evaluate/perplexity.py),
all on the same tokens, in bits per token, bits per byte and perplexity.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from minillama.evaluate.ngram import NGramLM
from minillama.lab.common import (bits, corpus_texts, entropy_bits, figure, progress, save, small_llama, table,
                                  token_stream, train_steps)
from minillama.model import Llama

QUICK = dict(train_bytes=200_000, val_bytes=20_000, vocab=512, dim=64, layers=2, steps=50, batch=8, seq_len=64,
             lr=3e-3)
FULL = dict(train_bytes=None, val_bytes=None, vocab=2048, dim=192, layers=4, steps=1000, batch=16, seq_len=128,
            lr=2e-3)
EPSILON = 0.05  # the notes' 5% garbage


def notes_examples() -> list[dict]:
    """The notes' worked examples: p = 1/8 taking 3 bits (line 124), coins (lines 126-135), a 4-symbol code
    (lines 1322, 1369-1370: 1.75 bits, and 2.25 bits for another distribution sent with that code)."""
    H = lambda *p: float(entropy_bits(torch.tensor(p, dtype=torch.float64)))  # noqa: E731
    code = torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 8], dtype=torch.float64)  # the code built for p: 1, 2, 3, 3 bits
    other = torch.tensor([1 / 8, 1 / 2, 1 / 4, 1 / 8], dtype=torch.float64)  # another distribution sent with it
    return [
        {"example": "fair coin H(0.5, 0.5)", "notes": "1 bit", "computed": H(0.5, 0.5)},
        {"example": "biased coin H(0.9, 0.1)", "notes": "≈0.468 bits", "computed": H(0.9, 0.1)},
        {"example": "code length of p = 1/8", "notes": "3 bits", "computed": -math.log2(1 / 8)},
        {"example": "H(p), p = (1/2, 1/4, 1/8, 1/8)", "notes": "1.75 bits", "computed": H(*code.tolist())},
        {"example": "cross-entropy H(q, p), q = (1/8, 1/2, 1/4, 1/8)", "notes": "2.25 bits",
         "computed": float(-(other * code.log2()).sum())},
    ]


def score(name: str, nll_nats: float, tokens: int, n_bytes: int) -> dict:
    bits_per_token = nll_nats / math.log(2) / tokens
    return {"model": name, "bits/token": bits_per_token, "bits/byte": nll_nats / math.log(2) / n_bytes,
            "perplexity": math.exp(nll_nats / tokens), "2^(bits/token)": 2**bits_per_token}


def epsilon_mixture(log_p: np.ndarray, vocab: int, eps: float) -> dict:
    """q = (1-ε)·p + ε·uniform: perplexity_q / perplexity_p, against the notes' bound 1/(1-ε)."""
    log_q = np.log((1 - eps) * np.exp(log_p) + eps / vocab)
    ratio = math.exp(-log_q.mean()) / math.exp(-log_p.mean())
    return {"epsilon": eps, "perplexity ratio": ratio, "bound 1/(1-ε)": 1 / (1 - eps), "within": ratio <= 1 / (1 - eps)}


def train_model(c: dict, tokenizer, train_ids, bar) -> tuple[Llama, list[dict]]:
    model = small_llama(tokenizer.vocab_size, c["dim"], c["layers"], c["seq_len"])
    history = train_steps(model, train_ids, c["steps"], batch_size=c["batch"], seq_len=c["seq_len"], lr=c["lr"],
                          bar=bar)
    return model, history


def draw(rows: list[dict], history: list[dict], bytes_per_token: float):
    fig, (ax1, ax2) = figure(2)
    ax1.barh([r["model"] for r in rows], [r["bits/byte"] for r in rows])
    for i, r in enumerate(rows):
        ax1.text(r["bits/byte"], i, f" ppl {r['perplexity']:.1f}", va="center", fontsize=8)
    ax1.set(xlabel="bits per byte (validation)", title="the same text under each model")
    ax1.invert_yaxis()
    steps = [h["step"] for h in history]
    ax2.plot(steps, [h["loss"] / math.log(2) / bytes_per_token for h in history], label="Llama, training batches")
    for r in rows:
        if "gram" in r["model"]:
            ax2.axhline(r["bits/byte"], linestyle=":", color="gray")
            ax2.text(steps[-1], r["bits/byte"], r["model"], fontsize=7, va="bottom", ha="right")
    ax2.set(xlabel="step", ylabel="bits per byte", title="training (dotted: n-grams on validation)")
    ax2.legend()
    return fig


def summary(rows: list[dict], identity: bool, mixture: dict, V: int) -> str:
    llama, ngram_best = rows[-1]["bits/token"], min(r["bits/token"] for r in rows if "gram" in r["model"])
    return (f"perplexity = 2^(bits/token) {'holds for every row' if identity else 'FAILS'}; the uniform model's "
            f"perplexity is {rows[0]['perplexity']:.6g} for V = {V}; the trained Llama is "
            f"{'better' if llama < ngram_best else 'NOT better'} than the best n-gram here ({llama:.3f} vs "
            f"{ngram_best:.3f} bits/token); {EPSILON:.0%} garbage raised the best n-gram's perplexity "
            f"{mixture['perplexity ratio']:.4f}x (bound {1 / (1 - EPSILON):.4f})")


def run(out: Path, quick: bool = False) -> dict:
    from minillama.tokenizer import load_tokenizer
    from minillama.tokenizer.train import train_tokenizer

    c = QUICK if quick else FULL
    bar = progress(c["steps"] + 7, "entropy-perplexity")
    train_texts, val_texts = corpus_texts("shakespeare", c["train_bytes"], c["val_bytes"])
    with tempfile.TemporaryDirectory() as folder:
        train_tokenizer(train_texts, c["vocab"], folder)
        tokenizer = load_tokenizer(folder)
    train_ids, val_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    V, n_bytes, scored = tokenizer.vocab_size, sum(len(t.encode()) for t in val_texts), len(val_ids) - 1
    bar.update(1)
    rows = [score("uniform", scored * math.log(V), scored, n_bytes)]
    best = None
    for order in range(1, 6):
        log_p = NGramLM(order, V).fit(train_ids.numpy()).log_probs(val_ids.numpy())
        rows.append(score(f"{order}-gram (Kneser-Ney)", float(-log_p.sum()), scored, n_bytes))
        best = log_p if best is None or log_p.sum() > best.sum() else best
        bar.update(1)
    model, history = train_model(c, tokenizer, train_ids, bar)
    r = bits(model, val_ids, c["seq_len"])
    rows.append(score(f"Llama {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, {c['steps']} steps",
                      r["nll"], r["tokens"], n_bytes))
    bar.update(1)
    bar.close()
    examples, mixture = notes_examples(), epsilon_mixture(best, V, EPSILON)
    tables = [table(examples), table(rows), table([mixture])]
    print("\n\n".join(tables))
    identity = all(math.isclose(r["perplexity"], r["2^(bits/token)"], rel_tol=1e-9) for r in rows)
    verdict = summary(rows, identity, mixture, V)
    print(verdict)
    results = {"config": c, "vocab_size": V, "val_bytes": n_bytes, "val_tokens_scored": scored,
               "notes_examples": examples, "models": rows, "identity_holds": identity, "epsilon_mixture": mixture,
               "history": history, "verdict": verdict, "tables": tables}
    save(out, "entropy-perplexity", results, draw(rows, history, n_bytes / scored))
    return results
