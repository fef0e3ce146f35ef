"""Attention maps: which of SmolLM2's heads attend from "it" to "animal".

The notes (002, lines 741-750 and 838-842) use "The animal didn't cross the street because it was too tired":
"when encoding 'it', one head attends most to 'the animal', another to 'tired'". That picture comes from an
encoder (Tensor2Tensor), where every token sees the whole sentence. Llama is a decoder: "it" sees only the
tokens before it, so no head can look at "tired" from "it", and "it"'s attention is the same whatever comes
after. The experiment reads every head's weights on SmolLM2-135M (30 layers x 9 heads) with the model's own
reference attention (lab/common.py, attention_weights), ranks the heads by the weight from "it" to "animal",
and checks what the decoder can do instead: at the last word, "tired" (the animal is tired) against "wide"
(the street is wide), do heads move their weight between "animal" and "street"?
"""

from pathlib import Path

import torch

from minillama.lab.common import attention_weights, figure, one_thread, progress, save, smollm2, table

SENTENCE = "The animal didn't cross the street because it was too tired"
CONTRAST = "The animal didn't cross the street because it was too wide"
TOP = 8  # heads drawn


def weights_of(model, tokenizer, text: str):
    """(tokens, weights (L, H, T, T)) for one sentence."""
    ids = tokenizer.encode(text)
    layers = attention_weights(model, torch.tensor([ids]))
    return [tokenizer.decode([i]) for i in ids], torch.stack([w[0] for w in layers])


def position(tokens: list[str], word: str) -> int:
    return next(i for i, t in enumerate(tokens) if t.strip() == word)


def rank_heads(tokens, w) -> list[dict]:
    """Every head: weight from "it" to "animal" and to "street", and the token "it" attends to most apart from
    the first one (most heads park their weight on the first token, an "attention sink")."""
    it, animal, street = position(tokens, "it"), position(tokens, "animal"), position(tokens, "street")
    rows = []
    for layer in range(w.shape[0]):
        for head in range(w.shape[1]):
            row = w[layer, head, it]  # (T,)
            rows.append({"layer": layer, "head": head, "it->animal": float(row[animal]),
                         "it->street": float(row[street]), "it->first token": float(row[0]),
                         "top after first": tokens[1 + int(row[1:it + 1].argmax())]})
    return sorted(rows, key=lambda r: -r["it->animal"])


def last_word_shift(tokens, w_tired, w_wide) -> list[dict]:
    """From the last word: (weight to animal - weight to street) with "tired" and with "wide", per head."""
    animal, street = position(tokens, "animal"), position(tokens, "street")
    lean = lambda w: w[:, :, -1, animal] - w[:, :, -1, street]  # noqa: E731  (L, H)
    shift = lean(w_tired) - lean(w_wide)
    rows = [{"layer": i, "head": h, "tired: animal-street": float(lean(w_tired)[i, h]),
             "wide: animal-street": float(lean(w_wide)[i, h]), "shift": float(shift[i, h])}
            for i in range(shift.shape[0]) for h in range(shift.shape[1])]
    return sorted(rows, key=lambda r: -abs(r["shift"]))


def draw(tokens, w, ranked: list[dict]):
    from matplotlib.patches import Rectangle

    fig, axes = figure(TOP + 1, width=3.4, height=3.4, rows=3)
    it, animal = position(tokens, "it"), position(tokens, "animal")
    grid = axes[0].imshow(w[:, :, it, animal].T, cmap="magma", aspect="auto", vmin=0)
    axes[0].set(xlabel="layer", ylabel="head", title='weight "it" -> "animal"')
    fig.colorbar(grid, ax=axes[0])
    for ax, r in zip(axes[1:], ranked[:TOP]):
        ax.imshow(w[r["layer"], r["head"]], cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        ax.add_patch(Rectangle((animal - 0.5, it - 0.5), 1, 1, fill=False, edgecolor="red"))
        ax.set_title(f"layer {r['layer']} head {r['head']}: {r['it->animal']:.2f}", fontsize=8)
    fig.tight_layout()
    return fig


@one_thread()  # SmolLM2's matrices on one core: on a busy 2-core machine two threads wait on each other
def run(out: Path, quick: bool = False, model=None, tokenizer=None) -> dict:
    model, tokenizer = smollm2(model, tokenizer)
    bar = progress(2, "attention-maps")
    tokens, w = weights_of(model, tokenizer, SENTENCE)
    bar.update(1)
    contrast_tokens, w_wide = weights_of(model, tokenizer, CONTRAST)
    bar.close()
    ranked = rank_heads(tokens, w)
    it = position(tokens, "it")
    same_prefix = torch.allclose(w[:, :, :it + 1, :it + 1], w_wide[:, :, :it + 1, :it + 1], atol=1e-6)
    shifts = last_word_shift(tokens, w, w_wide) if len(tokens) == len(contrast_tokens) else []
    n_animal = sum(r["top after first"].strip() == "animal" for r in ranked)
    tables = [table(ranked[:TOP]), table(shifts[:TOP]) if shifts else ""]
    print(f"tokens: {tokens}\n\n" + "\n\n".join(tables))
    top = ranked[0]
    verdict = (f"{n_animal} of {len(ranked)} heads attend from 'it' to 'animal' more than to any other token after the "
               f"first; the strongest is layer {top['layer']} head {top['head']} ({top['it->animal']:.2f}); "
               f"'it' cannot see 'tired' in a decoder: its weights are "
               f"{'identical' if same_prefix else 'NOT identical'} with 'wide' in place of 'tired'")
    toward = sum(r["shift"] > 0 for r in shifts[:20])
    if shifts:
        verdict += (f"; at the last word, {toward} of the 20 heads that move most lean more to 'animal' with 'tired' "
                    f"than with 'wide'; the largest move is layer {shifts[0]['layer']} head {shifts[0]['head']} "
                    f"(animal-street {shifts[0]['tired: animal-street']:+.2f} with 'tired', "
                    f"{shifts[0]['wide: animal-street']:+.2f} with 'wide')")
    print(verdict)
    results = {"sentence": SENTENCE, "contrast": CONTRAST, "tokens": tokens, "heads": ranked,
               "last_word_shift": shifts, "top_20_toward_referent": toward, "it_unchanged_by_later_words": same_prefix,
               "heads_it_to_animal": n_animal, "verdict": verdict, "tables": tables}
    save(out, "attention-maps", results, draw(tokens, w, ranked))
    return results
