"""Quality of a language model on a text: perplexity and bits per byte, by sliding windows.

A model sees at most `context` tokens, so a long text is cut into windows that start every `stride`
tokens, and every token is scored exactly once (Hugging Face, "Perplexity of fixed-length models"):
with stride == context the windows are disjoint and each window's first token goes unscored (nothing
before it in the window to predict it from); with stride < context a window scores only the tokens
no earlier window scored, and uses the tokens before them as context, so each prediction sees at
least context - stride tokens of history. Smaller strides cost more and give lower (better) numbers.

Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the text: unlike perplexity,
which is per token, it compares models with different tokenizers.

Shapes: B windows in a batch, T tokens per window, C model width, V vocabulary, N scored positions.
"""

import json
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minillama.config import GenerationConfig, UserError


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the text's ids
    end: int  # one past its last token
    first_scored: int  # first token (text index) this window scores; it scores first_scored .. end-1


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows that score every token of an n_tokens-long text (except the very first) exactly once."""
    check_window(context, stride)
    out, scored_until = [], 1  # token 0 has no history: it is never scored
    for start in range(0, n_tokens, stride):
        end = min(start + context, n_tokens)
        # a window's own first token cannot be predicted within it; tokens before scored_until already were
        first = max(scored_until, start + 1)
        if first < end:
            out.append(Window(start, end, first))
        scored_until = end
        if end == n_tokens:
            break
    return out


def check_window(context: int, stride: int) -> None:
    if context < 2:
        raise UserError(f"--context {context}: a window needs at least 2 tokens (one to predict from)")
    if not 1 <= stride <= context:
        raise UserError(f"--stride {stride}: use 1 <= stride <= context ({context}), "
                        "or some tokens would never be scored")


@torch.inference_mode()
def window_nll(model, ids, group: list[Window]) -> float:
    """Summed NLL (nats) of the scored tokens of equally long windows, run as one batch."""
    batch = torch.stack([ids[w.start:w.end] for w in group]).to(model.device)  # (B, T)
    hidden = model.hidden_states(batch)  # (B, T, C)
    total = 0.0
    for b, w in enumerate(group):
        # the logits at window position p predict the token at p + 1: take only the scored ones
        positions = slice(w.first_scored - w.start - 1, w.end - w.start - 1)
        logits = model.logits(hidden[b, positions]).float()  # (N, V)
        targets = batch[b, w.first_scored - w.start:]  # (N,)
        total += F.cross_entropy(logits, targets, reduction="sum").item()
    return total


def perplexity(model, ids, context: int, stride: int, batch_size: int = 4, progress: bool = False) -> dict:
    """Perplexity of `ids` (a 1-D sequence of token ids) under `model`, each token scored once.

    Returns {"perplexity", "nll" (total, nats), "tokens" (scored), "windows"}.
    """
    from tqdm import tqdm

    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1 or len(ids) < 2:
        raise UserError(f"need a 1-D sequence of at least 2 token ids to score, got shape {tuple(ids.shape)}")
    if context > model.config.max_seq_len:
        raise UserError(f"--context {context} is longer than the model's context of "
                        f"{model.config.max_seq_len} tokens: use --context {model.config.max_seq_len} or less")
    todo = windows(len(ids), context, stride)
    nll, scored = 0.0, 0
    total = sum(w.end - w.first_scored for w in todo)
    with tqdm(total=total, unit="tok", desc="perplexity", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(todo), batch_size):
            group = todo[i:i + batch_size]
            same = [w for w in group if w.end - w.start == group[0].end - group[0].start]
            rest = [w for w in group if w not in same]  # only the last, shorter window can differ
            for part in (same, rest):
                if part:
                    nll += window_nll(model, ids, part)
                    n = sum(w.end - w.first_scored for w in part)
                    scored += n
                    bar.update(n)
                    bar.set_postfix(ppl=f"{math.exp(nll / scored):.3f}")
    return {"perplexity": math.exp(nll / scored), "nll": nll, "tokens": scored, "windows": len(todo)}


@torch.inference_mode()
def streaming_perplexity(model, ids, window: int, sink_tokens: int, progress: bool = False) -> dict:
    """Perplexity of `ids` read as one stream through a bounded SinkCache (StreamingLLM, Xiao et al. 2023,
    arXiv:2309.17453, section 4.1): each token is predicted from the first sink_tokens tokens, the `window`
    latest and itself, however long the text. Until the cache is full nothing leaves it, so those tokens
    go in one forward pass; then one token per step, as generation reads them."""
    from tqdm import tqdm

    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1 or len(ids) < 2:
        raise UserError(f"need a 1-D sequence of at least 2 token ids to score, got shape {tuple(ids.shape)}")
    cache = model.new_cache(1, 0, window=window, sink_tokens=sink_tokens)
    stream = ids.to(model.device)[None]  # (1, N)
    first = min(len(ids) - 1, cache.max_len)
    logits = model.logits(model.hidden_states(stream[:, :first], None, cache)[0]).float()  # (first, V)
    nll = F.cross_entropy(logits, stream[0, 1:first + 1], reduction="sum").item()
    with tqdm(total=len(ids) - 1, initial=first, unit="tok", desc="perplexity", disable=not progress,
              file=sys.stderr) as bar:
        for t in range(first, len(ids) - 1):
            logits = model.logits(model.hidden_states(stream[:, t:t + 1], None, cache)[0]).float()  # (1, V)
            nll += F.cross_entropy(logits, stream[0, t + 1:t + 2], reduction="sum").item()
            bar.update(1)
    scored = len(ids) - 1
    return {"perplexity": math.exp(nll / scored), "nll": nll, "tokens": scored}


def evaluate_text(model, tokenizer, text: str, context: int, stride: int, max_tokens: int | None = None,
                  progress: bool = False, window: int | None = None, sink_tokens: int = 4) -> dict:
    """Tokenize `text` once as the tokenizer's defaults do (BOS included if it adds one), score it, and
    add bits per byte. With max_tokens, only the first max_tokens ids are scored and the bytes counted
    are those of the text they decode to."""
    ids = tokenizer.encode(text)
    n_bytes = len(text.encode("utf-8"))
    if max_tokens is not None and len(ids) > max_tokens:
        if max_tokens < 2:
            raise UserError(f"--max-tokens {max_tokens}: score at least 2 tokens")
        ids = ids[:max_tokens]
        n_bytes = len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    if len(ids) < 2:
        raise UserError(f"the text is {len(ids)} token long: nothing to score")
    if window is None:
        result = perplexity(model, ids, context, stride, progress=progress)
        result["context"], result["stride"] = context, stride
    else:
        result = streaming_perplexity(model, ids, window, sink_tokens, progress=progress)
        result["window"], result["sink_tokens"] = window, sink_tokens
    result["bytes"] = n_bytes
    result["bits_per_byte"] = result["nll"] / math.log(2) / n_bytes
    return result


# ---- command line: `minillama eval` ----

def read_text(args) -> str:
    from pathlib import Path

    if args.text is not None:
        path = Path(args.text)
        if not path.is_file():
            raise UserError(f"--text {path}: no such file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    from minillama.data.corpus import load_corpus, split

    docs = load_corpus(args.corpus)
    if len(docs) > 1:
        # the same held-out documents `minillama tokenizer train` uses by default (val_fraction 0.05, seed 0)
        _, docs = split(docs)
        print(f"scoring the validation split of {args.corpus}: {len(docs)} documents", file=sys.stderr)
    return "\n\n".join(d.text for d in docs)


def eval_flags(p) -> None:
    import dataclasses

    from minillama.checkpoint.load import model_flags
    from minillama.cli import add_fields

    p.description = "Perplexity by sliding windows; every token scored exactly once."
    model_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a UTF-8 text file")
    source.add_argument("--corpus", metavar="NAME",
                        help="a corpus spec (built-in name, file, folder, .jsonl); its validation split if "
                             "it has several documents")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per window (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts, <= context (default: context, disjoint windows)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    # --window and --sink-tokens, as generate has them (a bounded StreamingLLM cache): the text is then read
    # as one stream through it, and --context/--stride do not apply
    add_fields(p, GenerationConfig, skip=tuple(f.name for f in dataclasses.fields(GenerationConfig)
                                               if f.name not in ("window", "sink_tokens")))
    p.add_argument("--json", action="store_true", help="print one JSON object")


def eval_command(args) -> None:
    from minillama.checkpoint.load import load_from_flags

    if args.context is not None:  # bad window arguments fail before the (slow) load
        check_window(args.context, args.stride or args.context)
    config = GenerationConfig(window=args.window, sink_tokens=args.sink_tokens)  # checks them the same way
    text = read_text(args)
    model, tokenizer = load_from_flags(args)
    context = args.context or min(model.config.max_seq_len, 1024)
    stride = args.stride or context
    r = evaluate_text(model, tokenizer, text, context, stride, args.max_tokens, progress=True,
                      window=config.window, sink_tokens=config.sink_tokens)
    if args.json:
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}))
        return
    print(f"perplexity     {r['perplexity']:.4f}")
    print(f"bits per byte  {r['bits_per_byte']:.4f}")
    read = f"windows of {context}, stride {stride}" if args.window is None else \
        f"as a stream: {args.sink_tokens} sink tokens + a window of {args.window}"
    print(f"tokens scored  {r['tokens']:,} ({r['bytes']:,} bytes, {read})")
