"""Train a SentencePiece BPE tokenizer the way Llama 2's was trained, and measure it.

Llama 2's tokenizer.model records its trainer settings (Touvron et al. 2023, arXiv:2307.09288, §2.1:
"BPE ... SentencePiece ... split all numbers into individual digits, and use bytes to decompose unknown
UTF-8 characters"); we copy them except size, coverage and sentence length. Like Llama 2 we train on
lines, so a newline is never a piece: it is the byte piece <0x0A>.

`minillama tokenizer train --corpus shakespeare --vocab-size 4096 --out runs/tok` writes tokenizer.model
and the Hugging Face tokenizer files, then prints characters per token, the byte-fallback rate and
whether decode(encode(text)) == text on held-out documents.
"""

import io
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from minillama.checkpoint.atomic import write_atomic
from minillama.config import UserError

# the trainer_spec / normalizer_spec of Llama 2's tokenizer.model, minus input size and thread count
LLAMA2_SPM = dict(
    model_type="bpe",
    byte_fallback=True,  # a character outside the vocabulary becomes its UTF-8 bytes, never <unk>
    split_digits=True,  # 2023 -> 2 0 2 3
    normalization_rule_name="identity",  # no NFKC: the text is tokenized as written
    add_dummy_prefix=True,  # "Hello" is tokenized as " Hello", so a word looks the same at the start
    remove_extra_whitespaces=False,  # keep indentation and runs of spaces (code)
    allow_whitespace_only_pieces=True,  # "▁▁▁▁" can be one piece
    max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # <unk> <s> </s>, no padding token
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *,
                    val_texts: Iterable[str] = (), seed: int = 0, character_coverage: float = 0.9995,
                    max_sentences: int = 2_000_000, max_sentence_bytes: int = 65536, threads: int = 2,
                    model_type: str = "bpe") -> dict:
    """Train on the lines of `texts`; write out_dir/tokenizer.model and the HF files; report on `val_texts`.
    model_type "unigram" trains SentencePiece's unigram model instead (Kudo 2018, arXiv:1804.10959).

    character_coverage 0.9995 leaves the rarest 0.05% of characters to byte fallback (Chinese has thousands
    of rare characters; Llama 2 used 0.99995 on a far larger corpus). At most `max_sentences` lines,
    sampled with `seed`, are used: beyond a few million lines BPE merges hardly change.
    """
    import sentencepiece as spm

    from minillama.tokenizer import load_tokenizer

    _check_vocab_size(vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"lines": 0, "characters": 0}

    def lines():
        for text in texts:
            for line in text.split("\n"):
                if line:
                    counts["lines"] += 1
                    counts["characters"] += len(line)
                    yield line

    kind = "BPE" if model_type == "bpe" else model_type
    print(f"training a {vocab_size:,}-piece {kind} tokenizer with SentencePiece on {threads} threads ...",
          file=sys.stderr)
    start = time.time()
    spm.set_random_generator_seed(seed)  # which lines the sampler keeps when there are more than max_sentences
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
            character_coverage=character_coverage, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=max_sentence_bytes, num_threads=threads,
            minloglevel=2, **LLAMA2_SPM | {"model_type": model_type})
    except RuntimeError as e:
        raise UserError(_spm_message(str(e), counts["lines"])) from None
    seconds = time.time() - start
    print(f"trained on {counts['lines']:,} lines ({counts['characters']:,} characters) in {seconds:.1f}s",
          file=sys.stderr)
    path = write_atomic(out_dir / "tokenizer.model", model.getvalue())
    load_tokenizer(path).save(out_dir)  # + tokenizer.json and tokenizer_config.json for transformers
    print(f"wrote {path} and the Hugging Face tokenizer files", file=sys.stderr)
    report = {"vocab_size": vocab_size, "train_lines": counts["lines"], "train_characters": counts["characters"],
              "train_seconds": round(seconds, 2)}
    return report | measure(path, val_texts)


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 260:
        raise UserError(f"vocab size {vocab_size} is too small: 3 special tokens and 256 byte pieces come first")


def _spm_message(message: str, n_lines: int) -> str:
    if n_lines == 0:
        return "no text to train the tokenizer on"
    # 'INTERNAL: src/trainer_interface.cc(744) [condition] What went wrong.' -> 'What went wrong.'
    message = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", message)
    return f"sentencepiece could not train: {message}"


def measure(model_path: str | Path, texts: Iterable[str]) -> dict:
    """Characters per token, fraction of byte-fallback tokens, and decode(encode(t)) == t for every text."""
    import sentencepiece as spm

    from minillama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    byte_ids = {i for i in range(sp.vocab_size()) if sp.is_byte(i)}  # <0x00> ... <0xFF>
    newline = sp.piece_to_id("<0x0A>")  # trained on lines, so every newline is this byte piece
    n_texts = n_chars = n_tokens = n_bytes = n_newlines = 0
    first_loss = None
    for text in texts:
        ids = tokenizer.encode(text, bos=False, eos=False)
        n_texts, n_chars, n_tokens = n_texts + 1, n_chars + len(text), n_tokens + len(ids)
        n_bytes += sum(i in byte_ids for i in ids)
        n_newlines += ids.count(newline)
        if first_loss is None and tokenizer.decode(ids) != text:
            first_loss = n_texts - 1
    return {"val_texts": n_texts, "val_characters": n_chars, "val_tokens": n_tokens,
            "chars_per_token": round(n_chars / n_tokens, 3) if n_tokens else None,
            "byte_fallback_rate": round(n_bytes / n_tokens, 5) if n_tokens else None,
            "newline_rate": round(n_newlines / n_tokens, 5) if n_tokens else None,
            "lossless": first_loss is None if n_texts else None, "first_lossy_text": first_loss}


def tokenizer_flags(p) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a Llama 2 style SentencePiece BPE tokenizer on a corpus",
                       description="Train on the corpus minus a held-out split, write tokenizer.model and "
                                   "the Hugging Face files to --out, report on the held-out documents.")
    t.add_argument("--corpus", nargs="+", required=True, metavar="SPEC",
                   help="built-in name (shakespeare, bbc-news, people-daily), file, folder or .jsonl")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--seed", type=int, default=0, help="seed of the validation split and line sampling")
    t.add_argument("--val-fraction", type=float, default=0.05, help="documents held out (default 0.05)")


def tokenizer_command(args) -> None:
    from minillama.data.corpus import load_corpus, split

    _check_vocab_size(args.vocab_size)
    print(f"reading {' '.join(args.corpus)} ...", file=sys.stderr)
    docs = load_corpus(args.corpus)
    if len(docs) > 1:
        train, val = split(docs, val_fraction=args.val_fraction, seed=args.seed)
    else:  # one document (a single text file): nothing to hold out, so measure on the training text
        train, val = docs, docs
        print("one document: the report below is measured on the training text", file=sys.stderr)
    report = train_tokenizer((d.text for d in train), args.vocab_size, args.out,
                             val_texts=[d.text for d in val], seed=args.seed)
    print(f"vocab size       {report['vocab_size']:,}")
    print(f"trained on       {len(train):,} documents ({report['train_lines']:,} lines, "
          f"{report['train_characters']:,} characters) in {report['train_seconds']}s")
    if report["val_texts"]:
        rate_other = report["byte_fallback_rate"] - report["newline_rate"]
        print(f"validation       {report['val_texts']:,} documents, {report['val_characters']:,} characters, "
              f"{report['val_tokens']:,} tokens")
        print(f"chars per token  {report['chars_per_token']:.2f}")
        print(f"byte fallback    {report['byte_fallback_rate']:.2%} of tokens "
              f"({report['newline_rate']:.2%} newlines, {rate_other:.2%} other bytes)")
        print(f"lossless         {'yes' if report['lossless'] else 'NO'}: decode(encode(text)) == text")
    print(f"wrote            {args.out}")
