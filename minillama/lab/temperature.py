"""Temperature: sampling from p(x)^(1/T), renormalised.

The notes (002, lines 61-98) define the annealed distribution p_T(x) ∝ p(x)^(1/T): T = 0 is greedy, T = 1 the
model itself, T → ∞ uniform, and give the example p(cheese) = 0.4, p(mouse) = 0.6 -> 0.31 / 0.69 at T = 0.5,
0.12 / 0.88 at T = 0.2, 0 / 1 at T = 0. minillama's sampler divides the logits by T before the softmax
(infer/sampling.py), which is the same thing: softmax(log p / T) = p^(1/T) / Σ p^(1/T). This experiment
computes the example with that formula, draws from the real `sample()` to show the frequencies match, then
does the same on SmolLM2's next-token distribution: entropy and top tokens at several temperatures, and what
top-k, top-p and min-p keep of it.
"""

import math
from pathlib import Path

import torch

from minillama.config import GenerationConfig
from minillama.infer.sampling import filter_logits, sample
from minillama.lab.common import entropy_bits, figure, one_thread, progress, save, smollm2, table

NOTES_EXAMPLE = {"cheese": 0.4, "mouse": 0.6}
NOTES_TABLE = {1.0: (0.4, 0.6), 0.5: (0.31, 0.69), 0.2: (0.12, 0.88), 0.0: (0.0, 1.0)}  # T: (cheese, mouse)
PROMPT = "The mouse ate the"
TEMPERATURES = (0.2, 0.5, 0.8, 1.0, 1.5, 3.0)
CUTOFFS = {"top_k=20": dict(top_k=20), "top_p=0.9": dict(top_p=0.9), "min_p=0.05": dict(min_p=0.05)}


def annealed(logits: torch.Tensor, T: float) -> torch.Tensor:
    """p_T as the sampler makes it: softmax(logits / T); T = 0 is the argmax's one-hot (greedy)."""
    if T == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return (logits / T).softmax(-1)


def notes_example(draws: int) -> list[dict]:
    """The two-word example at each of the notes' temperatures: exact p_T and the frequency of `draws`
    tokens drawn by sample() (seeded)."""
    logits = torch.tensor(list(NOTES_EXAMPLE.values())).log()  # (2,) log p: any logits with these softmaxes
    rows = []
    for T, (cheese, mouse) in NOTES_TABLE.items():
        p = annealed(logits, T)
        drawn = sample(logits.expand(draws, 2), GenerationConfig(temperature=T), torch.Generator().manual_seed(0))
        rows.append({"T": T, "p(cheese)": float(p[0]), "p(mouse)": float(p[1]), "notes": f"{cheese:.2f} / {mouse:.2f}",
                     "drawn cheese": float((drawn == 0).float().mean()), "entropy bits": float(entropy_bits(p)) + 0.0})
    return rows


@torch.inference_mode()
def next_token_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(prompt)])
    return model.logits(model.hidden_states(ids)[0, -1]).float()  # (V,)


def real_distribution(logits: torch.Tensor, tokenizer, temperatures) -> tuple[list[dict], list[dict]]:
    """Entropy, top tokens and the notes' word " cheese" at each temperature; what each cut-off keeps at T = 1."""
    piece = lambda i: repr(tokenizer.decode([int(i)]))  # noqa: E731
    cheese = tokenizer.encode(" cheese")[-1]
    rows = []
    for T in temperatures:
        p = annealed(logits, T)
        top = p.topk(3)
        rows.append({"T": T, "entropy bits": float(entropy_bits(p)), "p(' cheese')": float(p[cheese]),
                     "top 3": ", ".join(f"{piece(i)} {v:.2f}" for v, i in zip(top.values, top.indices))})
    cut_rows = []
    for name, kwargs in CUTOFFS.items():
        kept = filter_logits(logits[None], **kwargs)[0].isfinite()  # (V,)
        cut_rows.append({"cut-off": name, "tokens kept": int(kept.sum()),
                         "mass kept": float(logits.softmax(-1)[kept].sum())})
    return rows, cut_rows


def draw(example: list[dict], logits: torch.Tensor, tokenizer, temperatures):
    fig, (ax1, ax2, ax3) = figure(3, width=5.0)
    Ts = [r["T"] for r in example]
    ax1.bar([x - 0.2 for x in range(len(Ts))], [r["p(cheese)"] for r in example], 0.4, label="cheese")
    ax1.bar([x + 0.2 for x in range(len(Ts))], [r["p(mouse)"] for r in example], 0.4, label="mouse")
    ax1.set_xticks(range(len(Ts)), [f"T={T:g}" for T in Ts])
    ax1.set_title("the notes' example: p^(1/T), renormalised")
    ax1.legend()
    order = logits.argsort(descending=True)[:25]
    for T in temperatures:
        ax2.plot(range(len(order)), annealed(logits, T)[order], marker=".", label=f"T={T:g}")
    for (name, kwargs), style in zip(CUTOFFS.items(), ("--", ":", "-.")):
        kept = int(filter_logits(logits[None], **kwargs)[0].isfinite().sum())
        ax2.axvline(min(kept, len(order)) - 0.5, color="gray", linestyle=style, label=f"{name}: {kept} kept")
    ax2.set_yscale("log")
    ax2.set_xticks(range(0, len(order), 4), [tokenizer.decode([int(i)]) for i in order[::4]], rotation=60)
    ax2.set_title(f"SmolLM2 after {PROMPT!r}")
    ax2.legend(fontsize=7)
    grid = [0.1 * 1.25**i for i in range(30)]
    ax3.plot(grid, [float(entropy_bits(annealed(logits, T))) for T in grid])
    ax3.axhline(math.log2(len(logits)), color="gray", linestyle="--", label="log2 V (uniform, T → ∞)")
    ax3.set_xscale("log")
    ax3.set(xlabel="temperature T", ylabel="entropy (bits)", title="entropy of p_T")
    ax3.legend()
    return fig


@one_thread()  # SmolLM2's matrices on one core: on a busy 2-core machine two threads wait on each other
def run(out: Path, quick: bool = False, model=None, tokenizer=None) -> dict:
    bar = progress(3, "temperature")
    example = notes_example(draws=4000 if quick else 100_000)
    bar.update(1)
    model, tokenizer = smollm2(model, tokenizer)
    logits = next_token_logits(model, tokenizer, PROMPT)
    bar.update(1)
    rows, cut_rows = real_distribution(logits, tokenizer, TEMPERATURES)
    bar.close()
    tables = [table(example), table(rows), table(cut_rows)]
    print("\n\n".join(tables))
    held = all(f"{r['p(cheese)']:.2f} / {r['p(mouse)']:.2f}" == r["notes"] for r in example)
    verdict = f"the notes' numbers {'reproduce exactly (to 2 decimals)' if held else 'do NOT reproduce'}"
    print(verdict)
    results = {"notes_example": example, "prompt": PROMPT, "smollm2": rows, "cutoffs": cut_rows,
               "claim_held": held, "verdict": verdict, "tables": tables}
    save(out, "temperature", results, draw(example, logits, tokenizer, TEMPERATURES))
    return results
