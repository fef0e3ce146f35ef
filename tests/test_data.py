"""Token shards and windows: BOS/EOS around every document, exact round trip, windows that depend only on
(seed, step) and that N processes can split."""

import json

import numpy as np
import pytest
import torch

from minillama.config import UserError
from minillama.data import shards as data
from minillama.data.shards import RandomWindows, TokenShards, pretokenize, sequential_windows, write_shards


class ByteTokenizer:
    """A stand-in tokenizer: UTF-8 bytes shifted by 3 (0 unk, 1 BOS, 2 EOS), so ids are easy to check."""

    def __init__(self, vocab_size=259):
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, 1, 2
        self.backend = type("Backend", (), {"to_str": lambda _: f"bytes+3, vocab {vocab_size}"})()

    def encode(self, text, bos=None, eos=False):
        return [1] * bool(bos) + [b + 3 for b in text.encode()] + [2] * eos

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode()


DOCS = ["First document.", "a second, longer document\nwith two lines", "三", "x" * 50]


def test_bos_eos_around_every_document_and_round_trip(tmp_path):
    tok = ByteTokenizer()
    shards = TokenShards(write_shards(DOCS, tok, tmp_path / "train", workers=2))
    tokens = shards.tokens().tolist()
    expected = [t for d in DOCS for t in tok.encode(d, bos=True, eos=True)]
    assert tokens == expected
    assert tokens.count(1) == tokens.count(2) == len(DOCS)
    # split at the EOS ids: every piece is BOS + one document
    pieces, start = [], 0
    for i, t in enumerate(tokens):
        if t == 2:
            pieces.append(tokens[start:i])
            start = i + 1
    assert [p[0] for p in pieces] == [1] * len(DOCS)
    assert [tok.decode(p[1:]) for p in pieces] == DOCS
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["tokens"] == len(expected) and index["documents"] == len(DOCS)
    assert not (tmp_path / "train.tmp").exists()


def test_many_shards_and_documents_keep_order(tmp_path):
    docs = [f"document number {i}" for i in range(1000)]  # many pool chunks
    tok = ByteTokenizer()
    shards = TokenShards(write_shards(docs, tok, tmp_path / "d", shard_tokens=1000, workers=2))
    assert len(shards.shards) > 10 and all(len(s) <= 1000 for s in shards.shards)
    assert shards.tokens().tolist() == [t for d in docs for t in tok.encode(d, bos=True, eos=True)]


def test_large_vocab_uses_uint32(tmp_path):
    tok = ByteTokenizer(vocab_size=70000)
    tok.encode = lambda text, bos=None, eos=False: [1, 69999, 2]
    shards = TokenShards(write_shards(["a"], tok, tmp_path / "d", workers=1))
    assert shards.index["dtype"] == "uint32" and shards.tokens().tolist() == [1, 69999, 2]


def test_real_tokenizer_shards(tmp_path):
    from minillama.tokenizer import load_tokenizer
    from minillama.tokenizer.train import train_tokenizer

    texts = [f"The {w} sat on the mat number {i}.\nIt was a {w}." for i, w in enumerate(["cat", "dog", "cow"] * 40)]
    train_tokenizer(texts, 300, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    tokens = TokenShards(write_shards(texts, tok, tmp_path / "d")).tokens().tolist()
    assert tokens == [t for d in texts for t in [tok.bos_id, *tok.encode(d, bos=False), tok.eos_id]]


def test_pretokenize_reuses_shards_only_for_the_same_texts_and_tokenizer(tmp_path, monkeypatch):
    written = []
    real = data.write_shards
    monkeypatch.setattr(data, "write_shards", lambda texts, tok, folder, **kw: written.append(folder.name) or
                        real(texts, tok, folder, workers=1, **kw))
    splits = {"train": DOCS[:3], "val": DOCS[3:]}
    pretokenize(splits, ByteTokenizer(), tmp_path)
    assert written == ["train", "val"]
    pretokenize(splits, ByteTokenizer(), tmp_path)  # cached
    assert written == ["train", "val"]
    pretokenize({"train": DOCS[:2], "val": DOCS[2:]}, ByteTokenizer(), tmp_path)  # the split moved
    pretokenize({"train": DOCS[:2], "val": DOCS[2:]}, ByteTokenizer(vocab_size=300), tmp_path)  # new tokenizer
    assert written == ["train", "val"] * 3
    assert TokenShards(tmp_path / "val").tokens().tolist()[0] == 1


@pytest.fixture
def shards(tmp_path):
    """Three shards of 100 consecutive numbers each (through the BOS/EOS-free path: a fake index)."""
    folder = tmp_path / "s"
    folder.mkdir()
    files = []
    for k in range(3):
        np.arange(100 * k, 100 * (k + 1), dtype=np.uint16).tofile(folder / f"{k:06d}.bin")
        files.append({"file": f"{k:06d}.bin", "tokens": 100})
    (folder / "index.json").write_text(json.dumps({"format": "minillama-tokens-v1", "dtype": "uint16",
                                                   "tokens": 300, "shards": files}))
    return TokenShards(folder)


def test_windows_depend_only_on_seed_and_step(shards):
    a, b = RandomWindows(shards, 8, 6, seed=1), RandomWindows(shards, 8, 6, seed=1)
    assert torch.equal(a.batch(5), b.batch(5))  # a fresh object (a resumed run) draws the same batch
    assert torch.equal(a.batch(5), a.batch(5))
    assert not torch.equal(a.batch(5), a.batch(6))
    assert not torch.equal(a.batch(5), RandomWindows(shards, 8, 6, seed=2).batch(5))
    x = a.batch(5)
    assert x.shape == (6, 9) and x.dtype == torch.int64


def test_windows_are_contiguous_and_inside_one_shard(shards):
    windows = RandomWindows(shards, 8, 64, seed=0)
    seen_shards = set()
    for step in range(20):
        for row in windows.batch(step):
            assert torch.equal(row, torch.arange(row[0], row[0] + 9))  # consecutive tokens
            assert row[0] // 100 == row[-1] // 100  # never crosses into the next shard
            seen_shards.add(int(row[0]) // 100)
    assert seen_shards == {0, 1, 2}


def test_process_slices_make_up_the_global_batch(shards):
    windows = RandomWindows(shards, 8, 6, seed=3)
    full = windows.batch(7)
    halves = [windows.batch(7, slice(0, 3)), windows.batch(7, slice(3, 6))]
    assert torch.equal(torch.cat(halves), full)


def test_sequential_validation_windows(shards):
    batches = sequential_windows(shards, 8, 4, max_batches=2)
    assert len(batches) == 2 and all(b.shape == (4, 9) for b in batches)
    starts = [int(r[0]) for b in batches for r in b]
    assert starts == [0, 8, 16, 24, 32, 40, 48, 56]  # stride T: every token is a target once
    assert all(torch.equal(x, y) for x, y in zip(batches, sequential_windows(shards, 8, 4, max_batches=2)))
    # a split too small for one batch repeats its windows
    small = sequential_windows(shards, 90, 4, max_batches=3)
    assert len(small) == 1 and small[0].shape == (4, 91)


def test_too_little_data_is_a_user_error(shards):
    with pytest.raises(UserError, match="seq-len"):
        RandomWindows(shards, 100, 2, seed=0)
    with pytest.raises(UserError, match="seq-len"):
        sequential_windows(shards, 100, 2, 1)
    with pytest.raises(UserError, match="index.json"):
        TokenShards(shards.folder / "nowhere")
