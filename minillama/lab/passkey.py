"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300): a number hidden at a random depth in
repeated filler, asked for at the end. A model that reads its whole context finds it; one that cannot
attend that far, or whose positions past its training length are garbage, does not.

The text is made of a small word-level vocabulary: the words of the filler and the question, and the keys
0..99 as one token each, so a tiny model learns the task in a few minutes: finding the token after
"pass key is" is the induction-head pattern (Olsson et al. 2022).
"""

import random

import torch

FILLER = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again ."
NEEDLE = "the pass key is {key} . remember it . {key} is the pass key ."
QUESTION = "what is the pass key ? the pass key is"
KEYS = 100
WORDS = sorted(set(FILLER.split()) | set(NEEDLE.split()) - {"{key}"} | set(QUESTION.split())) + \
    [str(n) for n in range(KEYS)]
VOCAB = {word: i for i, word in enumerate(WORDS)}


def encode(text: str) -> list[int]:
    return [VOCAB[word] for word in text.split()]


def example(length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(prompt ids, [key id]): filler with the needle at a random depth, then the question; the prompt and
    the answer are `length` tokens together."""
    key = str(rng.randrange(KEYS))
    needle, question = encode(NEEDLE.format(key=key)), encode(QUESTION)
    room = length - len(needle) - len(question) - 1
    if room < 0:
        raise ValueError(f"a passkey prompt needs at least {length - room} tokens, not {length}")
    filler = encode(FILLER)
    filler = (filler * (room // len(filler) + 1))[:room]
    depth = rng.randint(0, room)
    return filler[:depth] + needle + filler[depth:] + question, encode(key)


def training_batch(batch_size: int, length: int, rng: random.Random) -> torch.Tensor:
    """(B, length + 1) rows of prompt + answer: the trainer predicts every next token."""
    rows = [sum(example(length + 1, rng), []) for _ in range(batch_size)]
    return torch.tensor(rows, dtype=torch.long)


@torch.inference_mode()
def accuracy(model, length: int, n: int, seed: int = 0, batch_tokens: int = 4096) -> float:
    """Share of n prompts of `length` tokens (answer included) whose greedy answer is the key."""
    rng = random.Random(seed)
    examples = [example(length, rng) for _ in range(n)]
    prompts = torch.tensor([prompt for prompt, _ in examples], device=model.device)  # (n, length - 1)
    rows = max(1, batch_tokens // length)
    right = 0
    for i in range(0, n, rows):
        last = model.hidden_states(prompts[i:i + rows])[:, -1]  # (B, C)
        guess = model.logits(last).argmax(-1).tolist()  # greedy: the most likely next token
        right += sum(g == key[0] for g, (_, key) in zip(guess, examples[i:i + rows]))
    return right / n
