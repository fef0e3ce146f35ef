"""SFT data: conversations -> token ids, with the loss on the assistant's tokens only.

A .jsonl file holds one example a line: {"messages": [{"role": "system" | "user" | "assistant", "content":
"..."}, ...]} (OpenAI's chat format), or {"prompt": "...", "completion": "..."} (one user turn and its answer).

The labels come from the rendered text, not from tokenizing pieces: the conversation is rendered once with the
checkpoint's chat template and tokenized once, keeping each token's character offsets. Rendering the
conversation up to an answer (with the generation prompt) gives the text before it, and up to and including
the answer the text after, so the answer's characters are known; a token carries loss when it starts inside
them, up to and including the turn's end-of-turn token (the one that teaches the model to stop). Tokenizing
the pieces apart would give other tokens at their seams than the whole text does.
"""

from pathlib import Path

from minillama.config import UserError
from minillama.data.examples import IGNORE, BadLines, Example, read_jsonl
from minillama.infer.templates import render_chat

ROLES = ("system", "user", "assistant")


def conversation_of(record: dict) -> list[dict]:
    """A JSONL record -> its messages; ValueError says what is wrong with it."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" is not a non-empty list')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f'message {i} is not {{"role": system|user|assistant, "content": text}}')
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise ValueError('neither "messages" nor "prompt" and "completion" (text)')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) characters of each assistant turn in it."""
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render this conversation's beginning as a prefix of "
                             f"the whole (at message {i}), so its answers cannot be located")
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, for each, whether it is an assistant token to learn."""
    text, spans = assistant_spans(tokenizer, messages)
    # the template writes any BOS itself; special: "<|im_start|>" is one token, as in generation
    ids, offsets = tokenizer.encode_with_offsets(text, special=True)
    learn = [False] * len(ids)
    ends = tokenizer.eos_ids  # EOS and end-of-turn tokens (<|im_end|>, </s>, ...)
    for start, end in spans:
        for j, (a, _) in enumerate(offsets):
            if start <= a < end:
                learn[j] = True
                if ids[j] in ends:  # the turn ends here: what the template adds after it (a newline) is not
                    break           # the answer, and the model stops generating at this token anyway
    return ids, learn


def sft_example(tokenizer, messages: list[dict], seq_len: int, source: str) -> Example:
    """One conversation as an Example: inputs = ids[:-1], targets = ids[1:] where learnt; ValueError if it
    does not fit seq_len."""
    ids, learn = encode_conversation(tokenizer, messages)
    if len(ids) - 1 > seq_len:
        raise ValueError(f"{len(ids)} tokens with the chat template, longer than --seq-len {seq_len} + 1")
    targets = [t if keep else IGNORE for t, keep in zip(ids[1:], learn[1:])]
    return Example(ids[:-1], targets, source)


def read_sft(path, tokenizer, seq_len: int, bad: BadLines) -> list[Example]:
    """Every usable example of a .jsonl file; a bad line stops with its file and line, or is skipped."""
    path = Path(path)
    examples = []
    for source, record in read_jsonl(path, bad):
        try:
            examples.append(sft_example(tokenizer, conversation_of(record), seq_len, source))
        except ValueError as e:
            bad(source, str(e))
    if not examples:
        raise UserError(f"{path}: no usable examples")
    return examples
