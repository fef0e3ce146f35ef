"""Padding: why a batch of prompts is padded on the left for generation, and the mask built by broadcasting.

The notes ask "why pad on the left" (000, line 6) and build the causal mask by broadcasting (000, lines
44-45; 001, lines 138-142). A generator reads each row's next token from the last column and appends the
new token after it. With right padding the last column of a shorter prompt is a pad, so its first new
token is predicted after a pad, not after the prompt; with left padding every row's last column is its
last real token. The experiment runs one greedy batch loop twice, the padding side the only difference,
against each prompt generated alone by minillama's generator, and draws the mask (model/llama.py,
attention_mask_of) of the padded batch: causal (k <= q) & real keys, built from a (T, 1) and a (1, S)
comparison and the (B, 1, S) key mask.
"""

from pathlib import Path

import torch

from minillama.config import GenerationConfig
from minillama.infer.generate import generate_ids
from minillama.lab.common import figure, one_thread, progress, save, smollm2, table
from minillama.model.llama import attention_mask_of

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived a", "2 + 2 ="]


def pad(prompts: list[list[int]], side: str, pad_id: int):
    """ids, mask (B, T): each prompt padded with pad_id on the `side` ("left" or "right") to the longest."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        cols = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[b, cols], mask[b, cols] = torch.tensor(p), 1
    return ids, mask


@torch.inference_mode()
def batched_greedy(model, ids, mask, new_tokens: int) -> list[list[int]]:
    """The plain batched loop: prefill the padded batch into a KV cache, read every row's next token from
    the last column, append it to every row, repeat. (B, new_tokens) as lists."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
    hidden = model.hidden_states(ids, mask, cache)  # (B, T, C)
    out = []
    for _ in range(new_tokens):
        next_ids = model.logits(hidden[:, -1]).argmax(-1)  # (B,) from the last column
        out.append(next_ids)
        hidden = model.hidden_states(next_ids[:, None], None, cache)  # (B, 1, C)
    return torch.stack(out, dim=1).tolist()


def one_by_one(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt alone through minillama's generator (no padding at all), greedy."""
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [[step[0] for step in generate_ids(model, [p], config)] for p in prompts]


def draw(ids, mask, tokenizer):
    """The mask of the left-padded batch: causal part, key part, and their broadcast AND, row by row."""
    B, T = ids.shape
    full = attention_mask_of(mask.bool(), T)[:, 0]  # (B, T, S)
    causal = torch.arange(T)[None, :] <= torch.arange(T)[:, None]  # (T, S)
    fig, axes = figure(B + 1, width=3.6, height=3.8)
    axes[0].imshow(causal, cmap="Greens", vmin=0, vmax=1)
    axes[0].set_title("causal: k <= q\n(T, 1) vs (1, S) broadcast", fontsize=9)
    for b in range(B):
        axes[b + 1].imshow(full[b], cmap="Greens", vmin=0, vmax=1)
        labels = ["<pad>" if not m else tokenizer.decode([int(i)]) for i, m in zip(ids[b], mask[b])]
        axes[b + 1].set_xticks(range(T), labels, rotation=90, fontsize=6)
        axes[b + 1].set_yticks(range(T), labels, fontsize=6)
        axes[b + 1].set_title(f"row {b}: causal & real keys\n(left padding, {int(mask[b].sum())} real)", fontsize=9)
    return fig


@one_thread()  # SmolLM2's matrices on one core: on a busy 2-core machine two threads wait on each other
def run(out: Path, quick: bool = False, model=None, tokenizer=None) -> dict:
    new_tokens = 6 if quick else 12
    model, tokenizer = smollm2(model, tokenizer)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    bar = progress(3, "padding")
    alone = one_by_one(model, prompts, new_tokens)
    bar.update(1)
    outputs = {side: batched_greedy(model, *pad(prompts, side, pad_id), new_tokens) for side in ("left", "right")}
    bar.update(1)
    generator = [[] for _ in prompts]  # minillama's own batched generator (it pads on the left)
    for step in generate_ids(model, prompts, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0,
                                                               ignore_eos=True)):
        for row, token in step.items():
            generator[row].append(token)
    bar.close()
    rows = []
    for b, text in enumerate(PROMPTS):
        for name, tokens in (("alone", alone[b]), ("left-padded batch", outputs["left"][b]),
                             ("right-padded batch", outputs["right"][b]), ("generate_ids batch", generator[b])):
            rows.append({"prompt": text[:24] + ("..." if len(text) > 24 else ""), "run": name,
                         "same as alone": tokens == alone[b], "continuation": repr(tokenizer.decode(tokens))})
    left_ok = outputs["left"] == alone and generator == alone
    right_wrong = [b for b in range(len(prompts)) if outputs["right"][b] != alone[b]]
    verdict = (f"left padding {'equals' if left_ok else 'does NOT equal'} one-by-one generation; right padding "
               f"changes {len(right_wrong)} of {len(prompts)} rows (the shorter prompts: their last column is a pad)")
    tables = [table(rows)]
    print(tables[0])
    print(verdict)
    results = {"prompts": PROMPTS, "new_tokens": new_tokens, "alone": alone, "left": outputs["left"],
               "right": outputs["right"], "generate_ids": generator, "left_equals_alone": left_ok,
               "right_rows_changed": right_wrong, "verdict": verdict, "tables": tables}
    save(out, "padding", results, draw(*pad(prompts, "left", pad_id), tokenizer))
    return results
