"""The data stage: documents -> token shards on disk -> training and validation windows.

Shards (after llama2.c's tinystories.py): every document is encoded as BOS, its tokens, EOS, and the
documents are concatenated into flat `.bin` files of uint16 (vocab <= 65536) or uint32, read back with
numpy.memmap, so a corpus larger than RAM trains without loading it. A small `index.json` beside them
records the dtype, the special ids and each shard's length. EOS after every document is what teaches a
model to stop; llama2.c writes only BOS, so its models never emit an end.

Windows: a training batch is B windows of T+1 tokens (inputs and the targets one to the right) at
positions drawn from a generator seeded with (seed, step). The data position of a run is therefore just
its step counter: a resumed run, or N processes each taking a slice of the rows, see exactly the
batches one uninterrupted process would.
"""

import hashlib
import itertools
import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minillama.checkpoint.atomic import atomic_folder, write_atomic
from minillama.config import UserError

FORMAT = "minillama-tokens-v1"
SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB of uint16 per shard

_worker_tokenizer = None  # set in each pool worker (inherited through fork, so the tokenizer needs no pickling)


def _init_worker(tokenizer):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: list[str]) -> np.ndarray:
    """BOS + tokens + EOS of each text, concatenated: one array pickles back far faster than lists of ints."""
    return np.array([i for t in texts for i in _worker_tokenizer.encode(t, bos=True, eos=True)], dtype=np.int64)


def _chunks(texts: list[str], workers: int) -> list[list[str]]:
    """Groups of documents, about 4 per worker so both cores stay busy to the end, at most 256 documents
    each so the progress bar moves."""
    size = max(1, min(256, math.ceil(len(texts) / (4 * workers))))
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def write_shards(texts: list[str], tokenizer, folder: str | Path, shard_tokens: int = SHARD_TOKENS,
                 workers: int | None = None, desc: str = "tokenize") -> Path:
    """Encode texts as BOS + tokens + EOS, concatenated in input order, into folder/NNNNNN.bin + index.json.

    Written to a temporary folder renamed into place (atomic_folder), so a folder that exists is complete.
    """
    folder = Path(folder)
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise UserError("the tokenizer has no BOS or EOS token; pretraining data needs both around each document")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    with atomic_folder(folder) as tmp:
        shards = _write_bins(texts, tokenizer, tmp, dtype, shard_tokens, workers or min(os.cpu_count() or 1, 8), desc)
        index = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                 "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "documents": len(texts),
                 "tokens": sum(s["tokens"] for s in shards), "shards": shards}
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folder


def _write_bins(texts, tokenizer, folder: Path, dtype, shard_tokens: int, workers: int, desc: str) -> list[dict]:
    """The .bin files of write_shards, encoded by `workers` processes; returns [{"file", "tokens"}]."""
    shards, out, filled = [], None, 0
    bar = tqdm(total=len(texts), desc=desc, unit="doc", disable=not texts)
    # fork: the workers inherit the tokenizer instead of unpickling it (a SentencePiece or Rust object)
    chunks = _chunks(texts, workers)
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer,)) as pool:
        for chunk, tokens in zip(chunks, pool.imap(_encode_chunk, chunks)):  # imap keeps document order
            if len(tokens) and tokens.max() >= tokenizer.vocab_size:
                raise UserError(f"tokenizer produced id {tokens.max()} >= its vocab_size {tokenizer.vocab_size}")
            tokens = tokens.astype(dtype)
            while len(tokens):  # a document may straddle two shards; windows never cross one
                if out is None:
                    shards.append({"file": f"{len(shards):06d}.bin", "tokens": 0})
                    out, filled = open(folder / shards[-1]["file"], "wb"), 0
                take = tokens[:shard_tokens - filled]
                take.tofile(out)
                filled += len(take)
                shards[-1]["tokens"] = filled
                tokens = tokens[len(take):]
                if filled == shard_tokens:
                    out.close()
                    out = None
            bar.update(len(chunk))
    if out is not None:
        out.close()
    bar.close()
    return shards


def pretokenize(splits: dict[str, list[str]], tokenizer, folder: str | Path) -> Path:
    """folder/<split>/ shards for each split, e.g. {"train": texts, "val": texts}, reused while the texts and
    the tokenizer are the same: folder/source.json holds their hash and is written last, so that its
    presence means complete shards."""
    folder = Path(folder)
    digest = hashlib.sha256(tokenizer.backend.to_str().encode())  # the whole tokenizer.json
    for name, texts in splits.items():
        digest.update(name.encode() + b"\0")
        for text in texts:
            digest.update(text.encode() + b"\1")
    source = {"splits": {name: len(texts) for name, texts in splits.items()}, "sha256": digest.hexdigest()}
    path = folder / "source.json"
    if path.exists() and json.loads(path.read_text()) == source:
        return folder
    path.unlink(missing_ok=True)
    for name, texts in splits.items():
        write_shards(texts, tokenizer, folder / name, desc=f"tokenize {name}")
    write_atomic(path, json.dumps(source, indent=1) + "\n")
    return folder


class TokenShards:
    """The memory-mapped shards of one folder written by write_shards."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "index.json"
        if not path.exists():
            raise UserError(f"{folder}: not a token shard folder (no index.json)")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT:
            raise UserError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT}")
        dtype = np.dtype(self.index["dtype"])
        self.shards = [np.memmap(folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                       for s in self.index["shards"] if s["tokens"]]
        self.folder = folder

    @property
    def num_tokens(self) -> int:
        return self.index["tokens"]

    def tokens(self) -> np.ndarray:
        """All tokens in order, as one array (for tests and small corpora)."""
        return np.concatenate(self.shards) if self.shards else np.zeros(0, dtype=np.int64)


class RandomWindows:
    """Training batches: window b of step s starts at a position drawn from rng(seed, s), uniform over
    every start in every shard (a window stays inside its shard)."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int):
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        starts = [max(0, len(s) - seq_len) for s in shards.shards]  # starts per shard: len - (T+1) + 1
        if not sum(starts):
            raise UserError(f"{shards.folder}: {shards.num_tokens} tokens cannot fill one window of "
                            f"seq_len + 1 = {seq_len + 1}; use more text or a smaller --seq-len")
        self.cumulative = np.cumsum(starts)  # start index i lies in the first shard whose cumsum exceeds i

    def positions(self, step: int) -> list[tuple[int, int]]:
        """(shard, offset) of each of the batch's windows at this step; depends on nothing else."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, self.cumulative[-1], size=self.batch_size)
        shard = np.searchsorted(self.cumulative, picks, side="right")
        offset = picks - np.concatenate([[0], self.cumulative[:-1]])[shard]
        return list(zip(shard.tolist(), offset.tolist()))

    def batch(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """(B, T+1) int64 windows of this step; `rows` picks one process's slice of the global batch."""
        T1 = self.seq_len + 1
        windows = [self.shards.shards[k][i:i + T1] for k, i in self.positions(step)[rows]]
        return torch.from_numpy(np.stack(windows).astype(np.int64))  # (B, T+1)


def sequential_windows(shards: TokenShards, seq_len: int, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """Validation batches: consecutive windows at stride T (each token is a target once), in order, at most
    max_batches full batches of (B, T+1). A split too small for one batch repeats its windows to fill it."""
    T1, wanted = seq_len + 1, batch_size * max_batches
    starts = ((s, i) for s in shards.shards for i in range(0, len(s) - T1 + 1, seq_len))
    windows = [s[i:i + T1] for s, i in itertools.islice(starts, wanted)]
    if not windows:
        raise UserError(f"{shards.folder}: the validation split ({shards.num_tokens} tokens) cannot fill one "
                        f"window of seq_len + 1 = {T1}; use more text or a smaller --seq-len")
    if len(windows) < batch_size:
        windows = (windows * batch_size)[:batch_size]
    n = len(windows) // batch_size
    return [torch.from_numpy(np.stack(windows[b * batch_size:(b + 1) * batch_size]).astype(np.int64))
            for b in range(n)]  # each (B, T+1)
