"""Perplexity: the window plan scores every token once, the batched scorer equals scoring each token from
its own history, a uniform model scores exactly its vocabulary size, and SmolLM2 agrees with transformers
running the Hugging Face sliding-window recipe on the same GGUF."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillama.cli import main
from minillama.config import UserError, preset
from minillama.evaluate.perplexity import evaluate_text, perplexity, windows
from minillama.model import Llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub

TEXT = (
    "The old lighthouse keeper had lived on the island for forty years. Every evening he climbed the "
    "hundred and twelve steps to the lamp room, wiped the great lens with a soft cloth, and lit the wick. "
    "Ships passed in the night without knowing his name, but they trusted the light, and that was enough "
    "for him. In the winter the storms came from the north, and the waves broke over the rocks so high "
    "that the spray reached the windows of his kitchen. He kept a logbook of every storm: the date, the "
    "direction of the wind, the height of the sea, and the ships he had seen. When the government "
    "decided to replace him with an automatic lamp, a young engineer arrived on the supply boat with "
    "boxes of wires and batteries. The keeper showed him the stairs, the lens and the logbook, and the "
    "engineer, who had expected an angry old man, found instead a patient teacher. They worked together "
    "for three weeks. On the last evening the engineer asked him what he would do on the mainland. "
    "\"I will sleep at night,\" the keeper said, \"and I will miss it every night.\""
)


# ---- the window plan ----

@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), context=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once(n, context, data):
    stride = data.draw(st.integers(1, context))
    plan = windows(n, context, stride)
    scored = [t for w in plan for t in range(w.first_scored, w.end)]
    if stride == context:  # disjoint windows: every token but each window's first
        assert scored == [t for t in range(1, n) if t % context]
    else:
        assert scored == list(range(1, n))  # in order, each exactly once
    for w in plan:
        assert w.end - w.start <= context and w.start < w.first_scored < w.end
        assert w.start % stride == 0


def test_windows_reject_bad_stride():
    with pytest.raises(UserError, match="stride"):
        windows(100, 16, 17)
    with pytest.raises(UserError, match="stride"):
        windows(100, 16, 0)


# ---- the scorer on tiny random models ----

@pytest.fixture(scope="module")
def tiny():
    return Llama(preset("tiny")).init_weights(seed=0).eval()


def reference_nll(model, ids, context, stride):
    """Each scored token's NLL from a forward pass over exactly its window's history: slow and obvious."""
    total = 0.0
    with torch.no_grad():
        for w in windows(len(ids), context, stride):
            for t in range(w.first_scored, w.end):
                logits = model(ids[None, w.start:t])[0, -1]  # (V,) prediction of token t
                total += F.cross_entropy(logits[None], ids[t:t + 1]).item()
    return total


@pytest.mark.parametrize("context,stride", [(8, 8), (8, 3), (8, 1), (40, 40)])
def test_perplexity_equals_scoring_each_token_from_its_window(tiny, context, stride):
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(3))
    r = perplexity(tiny, ids, context, stride, batch_size=3)
    expected = reference_nll(tiny, ids, context, stride)
    assert r["nll"] == pytest.approx(expected, rel=1e-5)
    assert r["tokens"] == sum(w.end - w.first_scored for w in windows(30, context, stride))
    assert r["perplexity"] == pytest.approx(math.exp(expected / r["tokens"]), rel=1e-5)
    one_by_one = perplexity(tiny, ids.tolist(), context, stride, batch_size=1)
    assert one_by_one["nll"] == pytest.approx(r["nll"], rel=1e-5) and one_by_one["tokens"] == r["tokens"]


def test_uniform_model_has_perplexity_vocab_size_and_log2v_bits_per_token():
    model = Llama(preset("tiny")).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all 0: every token has probability 1/V
    r = perplexity(model, torch.arange(40) % 256, context=8, stride=3)
    assert r["perplexity"] == pytest.approx(256, rel=1e-5)

    class Bytes:  # a byte tokenizer: one token per UTF-8 byte, no BOS
        def encode(self, text):
            return list(text.encode("utf-8"))

        def decode(self, ids, skip_special_tokens=False):
            return bytes(ids).decode("utf-8", errors="replace")

    r = evaluate_text(model, Bytes(), "héllo wörld, " * 5, context=16, stride=16)
    n_bytes = len(("héllo wörld, " * 5).encode())
    assert r["bytes"] == n_bytes and r["tokens"] == n_bytes - math.ceil(n_bytes / 16)
    assert r["bits_per_byte"] == pytest.approx(8 * r["tokens"] / n_bytes, rel=1e-5)  # log2(256) per token


def test_context_longer_than_the_model_is_a_user_error(tiny):
    with pytest.raises(UserError, match="context"):
        perplexity(tiny, torch.arange(300) % 256, context=tiny.config.max_seq_len + 1, stride=8)


# ---- SmolLM2 against transformers ----

@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_model, smollm2_tokenizer):  # conftest's, loaded once per session
    return smollm2_path, smollm2_model, smollm2_tokenizer


def hf_sliding_window_nll(model, ids, context, stride):
    """The recipe of Hugging Face's "Perplexity of fixed-length models" guide, counting exactly the
    tokens the loss averages over (labels are shifted inside the model; -100 = not scored)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        target_len = end - prev_end
        input_ids = ids[None, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss.item() * n, count + n, end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("context,stride", [(128, 128), (128, 64)])
def test_smollm2_perplexity_agrees_with_transformers(smollm2, hf_smollm2, context, stride):
    path, model, tokenizer = smollm2
    reference = hf_smollm2  # conftest's: transformers reading the same GGUF
    ids = torch.tensor(tokenizer.encode(TEXT))
    assert 200 <= len(ids) <= 400
    r = perplexity(model, ids, context, stride)
    nll, count = hf_sliding_window_nll(reference, ids, context, stride)
    assert r["tokens"] == count
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=0.01)
    assert 2 < r["perplexity"] < 100  # a real model on plain English: far below uniform (49152)


def test_cli_eval_prints_json(smollm2, tmp_path, capsys):
    path, model, tokenizer = smollm2
    text = tmp_path / "story.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = ["eval", "smollm2", "--text", str(text), "--context", "32", "--stride", "16", "--max-tokens", "50", "--json"]
    assert main(args + ["--plain"]) == 0  # the fp32 reference path: the same numbers as in-process
    r = json.loads(capsys.readouterr().out)
    ids = tokenizer.encode(TEXT)[:50]
    assert r["tokens"] == 49 and r["context"] == 32 and r["stride"] == 16
    reference = perplexity(model, ids, 32, 16)["perplexity"]
    assert r["perplexity"] == pytest.approx(reference, rel=1e-4)
    assert main(args) == 0  # the default fast path: Q4_1 blocks, bf16 GEMMs over whole windows
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(reference, rel=0.01)
    assert r["bytes"] == len(tokenizer.decode(ids, skip_special_tokens=True).encode())


def test_cli_eval_user_errors(tmp_path, capsys):
    assert main(["eval", "smollm2", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "smollm2", "--text", str(text), "--context", "16", "--stride", "32"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "stride" in err
