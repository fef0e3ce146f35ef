"""Labelled text: a built-in corpus with labels (bbc-news), a folder with one subfolder per label, or a .jsonl
with "text" and "label" on every line; a deterministic stratified train/validation/test split; and the prompt
a document becomes.

One prompt serves the classifier head, the SFT on labels and the zero-shot baseline: the document inside the
checkpoint's chat template, asked for its category among the labels, with the assistant's turn opened. The
last token is then where the model would write the answer, which is what the classifier head reads.
"""

import dataclasses
import random
from pathlib import Path

from minillama.config import UserError
from minillama.data.corpus import BUILTINS, Document, load_corpus
from minillama.data.examples import BadLines, Example, read_jsonl
from minillama.infer.templates import render_chat


def load_labelled(spec: str, bad: BadLines) -> list[Document]:
    """Documents that all carry a label, from a built-in name, a folder of label folders, or a .jsonl."""
    path = Path(spec)
    if spec in BUILTINS:
        docs = load_corpus(spec)
    elif path.suffix == ".jsonl" and path.is_file():
        docs = []
        for source, record in read_jsonl(path, bad):
            text, label = record.get("text"), record.get("label")
            if not isinstance(text, str) or not text.strip() or not isinstance(label, (str, int)):
                bad(source, 'needs "text" (non-empty) and "label" (a string or an integer)')
                continue
            docs.append(Document(text, source, str(label)))
    elif path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        if not folders:
            raise UserError(f"{path}: no label folders in it (a labelled folder holds one folder of texts per label)")
        docs = [Document(d.text, d.source, folder.name) for folder in folders for d in load_corpus(str(folder))]
    else:
        raise UserError(f"{spec}: not a labelled corpus (a built-in name, a folder of label folders or a .jsonl)")
    unlabelled = next((d for d in docs if d.label is None), None)
    if unlabelled is not None:
        raise UserError(f"{unlabelled.source}: has no label; {spec} is not a labelled corpus")
    if len({d.label for d in docs}) < 2:
        raise UserError(f"{spec}: one label only ({docs[0].label if docs else 'none'}); a classifier needs two")
    return docs


def stratified_split(docs: list[Document], val_fraction: float, test_fraction: float, seed: int = 0):
    """(train, val, test): each label's documents shuffled by a generator seeded with (seed, label), the first
    round(test_fraction·n) to test, the next round(val_fraction·n) to validation; input order kept."""
    part = {}
    for label in sorted({d.label for d in docs}):
        members = [i for i, d in enumerate(docs) if d.label == label]
        random.Random(f"{seed}:{label}").shuffle(members)
        n_test, n_val = round(test_fraction * len(members)), round(val_fraction * len(members))
        part |= {i: "test" for i in members[:n_test]} | {i: "val" for i in members[n_test:n_test + n_val]}
    return tuple([d for i, d in enumerate(docs) if part.get(i, "train") == name] for name in ("train", "val", "test"))


def classify_messages(labels: list[str], text: str) -> list[dict]:
    """The question every labelled task asks: which of the labels fits the text."""
    return [{"role": "user", "content": f"Which category is this text: {', '.join(labels)}? Answer with the "
                                        f"category only.\n\n{text.strip()}"}]


def fit_texts(tokenizer, labels: list[str], docs: list[Document], seq_len: int) -> list[Document]:
    """The documents with their text cut (by tokens) so that the question with it and the longest answer
    fits seq_len + 1 tokens: what every task then reads."""
    answer = [{"role": "assistant", "content": max(labels, key=len)}]

    def length(text: str) -> int:
        rendered = render_chat(tokenizer, classify_messages(labels, text) + answer, add_generation_prompt=False)
        return len(tokenizer.encode(rendered, bos=False, special=True))

    room = seq_len + 1 - length("")
    if room <= 0:
        raise UserError(f"--seq-len {seq_len} leaves no room for the text after the question and the labels")
    fitted = []
    for d in docs:
        ids = tokenizer.encode(d.text, bos=False)
        keep, cut = min(len(ids), room), d.text
        while keep < len(ids):  # decoding a cut and encoding it in context can add a token or two at the seams
            cut = tokenizer.decode(ids[:keep])
            excess = length(cut) - (seq_len + 1)
            if excess <= 0 or keep <= 1:
                break
            keep -= excess
        fitted.append(dataclasses.replace(d, text=cut))
    return fitted


def prompt_ids(tokenizer, labels: list[str], text: str) -> list[int]:
    """The question about `text` (already fit) with the assistant's turn opened: the classifier's input."""
    return tokenizer.encode(render_chat(tokenizer, classify_messages(labels, text)), bos=False, special=True)


def classification_examples(tokenizer, docs: list[Document], labels: list[str]) -> list[Example]:
    """Fitted documents as the question (inputs) and their label's index (target)."""
    return [Example(prompt_ids(tokenizer, labels, d.text), labels.index(d.label), d.source) for d in docs]


def answer_examples(tokenizer, docs: list[Document], labels: list[str], seq_len: int) -> list[Example]:
    """SFT on labels: the question about each fitted document, its label as the assistant's answer (the loss
    is on the answer)."""
    from minillama.data.sft import sft_example

    return [sft_example(tokenizer, classify_messages(labels, d.text) + [{"role": "assistant", "content": d.label}],
                        seq_len, d.source) for d in docs]
