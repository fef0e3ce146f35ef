"""Tokenizers: BPE against unigram, at several vocabulary sizes, on English and on Chinese.

The notes (002, lines 502-540) describe BPE (start from characters, merge the most frequent pair, repeat; run
on bytes so that no character is unseen) and the unigram model of SentencePiece (start large, drop the pieces
whose removal costs the likelihood least); Llama 2 uses SentencePiece BPE with byte fallback (001, lines
70-99; tokenizer/train.py). Both are trained here with SentencePiece and Llama 2's settings on Shakespeare and
on People's Daily, and measured on held-out text: tokens per byte, how often a character falls back to its
UTF-8 bytes (out of vocabulary), whether decoding gives the text back; then a small Llama trained on each for
the same steps, in bits per byte (comparable across tokenizers, unlike perplexity).

Chinese has thousands of characters. SentencePiece needs a piece for every character inside its
`character_coverage` (at least 0.98), so the coverage is lowered, down to 0.98, until those characters take
at most half of the vocabulary; the rarer ones fall back to bytes (the table shows the coverage used). Chinese
therefore starts at a larger vocabulary than English.
"""

import math
import tempfile
from collections import Counter
from pathlib import Path

from minillama.config import UserError
from minillama.lab.common import (bits, corpus_texts, figure, progress, save, small_llama, table, token_stream,
                                  train_steps)

CORPORA = ("shakespeare", "people-daily")
KINDS = ("bpe", "unigram")
SAMPLE = "Shakespeare 莎士比亚 wrote naïve verses 🙂"  # English, Chinese, a diacritic and an emoji
QUICK = dict(train_bytes=150_000, val_bytes=15_000, sizes={"shakespeare": (1024,), "people-daily": (2048,)},
             model_sizes=(1024, 2048), dim=64, layers=2, seq_len=64, batch=8, steps=20, lr=3e-3)
FULL = dict(train_bytes=2_000_000, val_bytes=200_000,
            sizes={"shakespeare": (512, 1024, 2048, 4096, 8192), "people-daily": (2048, 4096, 8192, 16384)},
            model_sizes=(2048, 8192), dim=96, layers=4, seq_len=64, batch=16, steps=250, lr=2e-3)
MIN_COVERAGE = 0.98  # the lowest character_coverage SentencePiece accepts


def coverage_for(texts: list[str], vocab_size: int, default: float = 0.9995) -> float:
    """The character coverage that gives single characters at most half of the pieces left after the 3 special
    and 256 byte pieces (SentencePiece adds characters, most frequent first, until their share reaches it),
    within [MIN_COVERAGE, default]."""
    counts = sorted(Counter(c for text in texts for c in text if c != "\n").values(), reverse=True)
    allowed = (vocab_size - 259) // 2
    if len(counts) <= allowed:
        return default
    share = sum(counts[:allowed]) / sum(counts)
    return max(MIN_COVERAGE, min(default, share * (1 - 1e-6)))


def measure_sample(tokenizer) -> dict:
    """How the sample sentence is cut: pieces, and how many of them are single bytes (byte fallback)."""
    ids = tokenizer.encode(SAMPLE, bos=False)
    pieces = [tokenizer.backend.id_to_token(i) for i in ids]
    return {"sample tokens": len(ids), "sample byte pieces": sum(p.startswith("<0x") for p in pieces),
            "sample pieces": " ".join(pieces)}


def train_one(corpus: str, kind: str, size: int, train, val, folder: Path) -> tuple[dict, object]:
    from minillama.tokenizer import load_tokenizer
    from minillama.tokenizer.train import train_tokenizer

    coverage = coverage_for(train, size)
    row = {"corpus": corpus, "kind": kind, "vocab": size, "coverage": coverage}
    try:
        report = train_tokenizer(train, size, folder, val_texts=val, character_coverage=coverage, model_type=kind)
    except UserError as e:  # e.g. a unigram vocabulary larger than the text supports
        return row | {"error": str(e)}, None
    tokenizer = load_tokenizer(folder)
    val_bytes = sum(len(t.encode()) for t in val)
    row |= {"tokens/byte": report["val_tokens"] / val_bytes, "chars/token": report["chars_per_token"],
            "byte fallback": report["byte_fallback_rate"] - report["newline_rate"], "lossless": report["lossless"]}
    return row | measure_sample(tokenizer), tokenizer


def model_bits_per_byte(c: dict, tokenizer, train, val, bar) -> float:
    """A small Llama trained on this tokenizer's tokens for the configured steps: validation bits per byte."""
    model = small_llama(tokenizer.vocab_size, c["dim"], c["layers"], c["seq_len"])
    train_ids, val_ids = token_stream(tokenizer, train), token_stream(tokenizer, val)
    history = train_steps(model, train_ids, c["steps"], batch_size=c["batch"], seq_len=c["seq_len"], lr=c["lr"],
                          bar=bar)
    if history[-1].get("diverged"):
        return float("nan")
    r = bits(model, val_ids, c["seq_len"])
    return r["nll"] / math.log(2) / sum(len(t.encode()) for t in val)


def draw(rows: list[dict]):
    fig, (ax1, ax2, ax3) = figure(3, width=4.6)
    for corpus in CORPORA:
        for kind, style in zip(KINDS, ("-o", "--s")):
            done = [r for r in rows if r["corpus"] == corpus and r["kind"] == kind and "error" not in r]
            if not done:
                continue
            label = f"{corpus} {kind}"
            ax1.plot([r["vocab"] for r in done], [r["tokens/byte"] for r in done], style, label=label)
            ax2.plot([r["vocab"] for r in done], [r["byte fallback"] for r in done], style, label=label)
            trained = [r for r in done if "model bits/byte" in r]
            ax3.plot([r["vocab"] for r in trained], [r["model bits/byte"] for r in trained], style, label=label)
    for ax, title in ((ax1, "tokens per byte (held out)"), (ax2, "tokens that are byte fallback"),
                      (ax3, "small Llama, same steps: bits per byte")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="vocabulary size", title=title)
        ax.legend(fontsize=7)
    return fig


def run(out: Path, quick: bool = False) -> dict:
    c = QUICK if quick else FULL
    sizes = [(corpus, size) for corpus in CORPORA for size in c["sizes"][corpus]]
    n_models = len(KINDS) * sum(size in c["model_sizes"] for _, size in sizes)
    bar = progress(n_models * c["steps"] + len(KINDS) * len(sizes), "tokenizers")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in CORPORA:
            train, val = corpus_texts(corpus, c["train_bytes"], c["val_bytes"])
            for kind in KINDS:
                for size in c["sizes"][corpus]:
                    row, tokenizer = train_one(corpus, kind, size, train, val, Path(tmp) / f"{corpus}-{kind}-{size}")
                    bar.update(1)
                    if tokenizer is not None and size in c["model_sizes"]:
                        row["model bits/byte"] = model_bits_per_byte(c, tokenizer, train, val, bar)
                    rows.append(row)
    bar.close()
    columns = ["corpus", "kind", "vocab", "coverage", "tokens/byte", "chars/token", "byte fallback", "lossless",
               "model bits/byte", "error"]
    samples = [{k: r[k] for k in ("corpus", "kind", "vocab", "sample tokens", "sample byte pieces", "sample pieces")}
               for r in rows if "sample pieces" in r]
    tables = [table(rows, columns), table(samples)]
    print("\n\n".join(tables))
    verdict = summary(rows)
    print(verdict)
    results = {"config": c, "sample": SAMPLE, "tokenizers": rows, "verdict": verdict, "tables": tables}
    save(out, "tokenizers", results, draw(rows))
    return results


def summary(rows: list[dict]) -> str:
    """Which kind needs fewer tokens per byte and reaches fewer bits per byte, per corpus (where both ran)."""
    parts = []
    for corpus in CORPORA:
        pairs = [(b, u) for b in rows for u in rows if b["corpus"] == u["corpus"] == corpus and b["vocab"] == u["vocab"]
                 and b["kind"] == "bpe" and u["kind"] == "unigram" and "error" not in b and "error" not in u]
        fewer = sum(b["tokens/byte"] < u["tokens/byte"] for b, u in pairs)
        trained = [(b, u) for b, u in pairs if "model bits/byte" in b and "model bits/byte" in u]
        better = sum(b["model bits/byte"] < u["model bits/byte"] for b, u in trained)
        lossless = all(r["lossless"] for r in rows if r["corpus"] == corpus and "error" not in r)
        parts.append(f"{corpus}: BPE needs fewer tokens per byte at {fewer} of {len(pairs)} sizes, its model reaches "
                     f"fewer bits per byte at {better} of {len(trained)}; every tokenizer "
                     f"{'lossless' if lossless else 'NOT lossless'}")
    return "; ".join(parts)
