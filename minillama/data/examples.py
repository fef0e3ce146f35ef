"""Fine-tuning batches: examples of different lengths (a rendered conversation, a text to classify), in an
order that is a function of the step, padded or packed into rows.

An example is `inputs` (n token ids) and `targets`: the n ids to predict, -100 where nothing is to be learnt
(SFT: prompts), or one class id (classification). Epoch e visits the examples in a permutation drawn from
(seed, e); step s takes rows s·B ... s·B + B-1 of the epochs laid end to end. So, as for pretraining's
windows (shards.py), a run's data position is its step counter: a resumed run and N processes each taking a
slice of the rows see exactly the batches of one uninterrupted process.

Rows are right-padded to the longest in the batch. Causal attention never lets a real token see the padding
after it, so unpacked SFT rows need no mask (and keep the fused causal kernel); a classifier gets a (B, T)
mask to find each row's last real token; packed rows get a (B, 1, T, T) block-diagonal causal mask, so
each example attends only to itself, and start their rotary positions at 0 (model/llama.py).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minillama.config import UserError

IGNORE = -100  # the target of a position that carries no loss (PyTorch's and Hugging Face's ignore_index)


@dataclass(frozen=True)
class Example:
    inputs: list[int]  # (n,) token ids
    targets: list[int] | int  # (n,) ids to predict, IGNORE where none; or a class id
    source: str  # file and line, or corpus item: for messages


class BadLines:
    """--on-bad-line: stop at the first bad example (a UserError naming file and line) or skip it with a
    warning; skipped ones are counted."""

    def __init__(self, policy: str = "stop"):
        if policy not in ("stop", "skip"):
            raise UserError(f"--on-bad-line {policy!r}: use stop or skip")
        self.policy, self.skipped = policy, 0

    def __call__(self, source: str, problem: str) -> None:
        if self.policy == "stop":
            raise UserError(f"{source}: {problem} (fix it, or pass --on-bad-line skip to leave such lines out)")
        self.skipped += 1
        print(f"warning: {source}: {problem}; skipped", file=sys.stderr)


def read_jsonl(path: Path, bad: BadLines) -> list[tuple[str, dict]]:
    """(source "path line N", record) for each non-blank line that is a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    records = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad(source, f"not valid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            bad(source, f"a JSON {type(record).__name__}, not an object")
            continue
        records.append((source, record))
    return records


def pack_rows(order, lengths: list[int], capacity: int) -> list[list[int]]:
    """Examples in `order` into rows of at most `capacity` tokens, each row filled until the next example
    does not fit (next-fit keeps the order, so the rows stay a function of the order alone)."""
    rows, used = [], capacity
    for i in order:
        if used + lengths[i] > capacity:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += lengths[i]
    return rows


class ExampleBatches:
    """The loop's batch source for fine-tuning: batch(step, rows) and validation(rows), dicts of the loss
    module's arguments (inputs, targets and, when needed, attention_mask)."""

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, seed: int, pad_id: int,
                 pack_len: int | None = None, eval_steps: int = 10):
        if not train or not val:
            raise UserError(f"fine-tuning needs training and validation examples; got {len(train)} and {len(val)}")
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed
        self.pad_id, self.pack_len, self.eval_steps = pad_id, pack_len, eval_steps
        self._epochs: dict[int, list[list[int]]] = {}

    def _rows(self, examples: list[Example], order) -> list[list[int]]:
        if self.pack_len is None:
            return [[int(i)] for i in order]
        return pack_rows(order, [len(e.inputs) for e in examples], self.pack_len)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            self._epochs[epoch] = self._rows(self.train, order)
        return self._epochs[epoch]

    def _row(self, index: int) -> list[int]:
        """Row `index` of the epochs laid end to end."""
        epoch = 0
        while index >= len(self._epoch(epoch)):
            index -= len(self._epoch(epoch))
            epoch += 1
        return self._epoch(epoch)[index]

    def batch(self, step: int, rows: slice = slice(None)) -> dict:
        B = self.batch_size
        chosen = [self._row(step * B + b) for b in range(B)][rows]
        return collate([[self.train[i] for i in row] for row in chosen], self.pad_id)

    def validation(self, rows: slice = slice(None)) -> list[dict]:
        """The validation examples in order: at most eval_steps full batches (a split smaller than one batch
        repeats its rows to fill it)."""
        B = self.batch_size
        all_rows = self._rows(self.val, range(len(self.val)))
        if len(all_rows) < B:
            all_rows = (all_rows * B)[:B]
        batches = [all_rows[i:i + B] for i in range(0, min(len(all_rows) // B, self.eval_steps) * B, B)]
        return [collate([[self.val[i] for i in row] for row in batch[rows]], self.pad_id) for batch in batches]


def collate(rows: list[list[Example]], pad_id: int) -> dict:
    """Rows of examples -> {"inputs" (B, T), "targets" (B, T) or (B,), "attention_mask" when needed}."""
    classify = isinstance(rows[0][0].targets, int)
    T = max(sum(len(e.inputs) for e in row) for row in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)  # which example of its row each token is
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for k, e in enumerate(row):
            n = len(e.inputs)
            inputs[b, start:start + n] = torch.tensor(e.inputs)
            mask[b, start:start + n] = 1
            segments[b, start:start + n] = k
            if not classify:
                targets[b, start:start + n] = torch.tensor(e.targets)
            start += n
    if classify:
        return {"inputs": inputs, "targets": torch.tensor([row[0].targets for row in rows]), "attention_mask": mask}
    if max(len(row) for row in rows) == 1:
        return {"inputs": inputs, "targets": targets}  # right padding under a causal mask: nothing to hide
    return {"inputs": inputs, "targets": targets, "attention_mask": packed_mask(segments)}


def packed_mask(segments):
    """segments (B, T) example index of each token (-1: padding) -> (B, 1, T, T) bool, True = may attend:
    causal and inside the token's own example, built by broadcasting."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal).unsqueeze(1)  # (B, 1, T, T)
