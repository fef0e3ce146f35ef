"""Labelled data and its scores: the three labelled inputs, a stratified split that is deterministic, texts
cut to fit, macro-F1 as scikit-learn computes it, the label a generated answer names, `params --lora`."""

import json

import pytest

from minillama.cli import main
from minillama.config import UserError
from minillama.data.corpus import Document, load_corpus
from minillama.data.examples import BadLines
from minillama.data.labelled import fit_texts, load_labelled, prompt_ids, stratified_split
from minillama.evaluate.classify import parse_label, scores


def test_folder_per_label_and_jsonl_with_labels(tmp_path):
    for label, texts in {"ham": ["hello friend", "see you"], "spam": ["win money", "cheap pills", "click"]}.items():
        (tmp_path / "mail" / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "mail" / label / f"{i}.txt").write_text(text)
    docs = load_labelled(str(tmp_path / "mail"), BadLines())
    assert sorted((d.label, d.text) for d in docs)[0] == ("ham", "hello friend") and len(docs) == 5
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n{"text": "c"}\n')
    with pytest.raises(UserError, match=r"d.jsonl line 3: needs \"text\""):
        load_labelled(str(data), BadLines())
    assert [d.label for d in load_labelled(str(data), BadLines("skip"))] == ["1", "x"]
    with pytest.raises(UserError, match="not a labelled corpus"):
        load_labelled(str(tmp_path / "nothing.txt"), BadLines())


def test_stratified_split_is_deterministic_and_keeps_proportions():
    docs = load_corpus("bbc-news")
    train, val, test = stratified_split(docs, 0.1, 0.2)
    assert (len(train), len(val), len(test)) == (1558, 223, 444)
    assert stratified_split(docs, 0.1, 0.2)[2] == test  # the same split every time: runs compare
    for label in ("business", "sports"):
        share = sum(d.label == label for d in test) / len(test)
        assert share == pytest.approx(sum(d.label == label for d in docs) / len(docs), abs=0.005)
    assert not {d.source for d in test} & {d.source for d in train + val}


def test_texts_are_cut_to_fit_the_question(smollm2_tokenizer):
    labels = ["business", "sports"]
    docs = [Document("word " * 500, "long", "business"), Document("Short one.", "short", "sports")]
    long, short = fit_texts(smollm2_tokenizer, labels, docs, 96)
    assert short.text == "Short one." and long.text.startswith("word word") and len(long.text) < 500
    assert len(prompt_ids(smollm2_tokenizer, labels, long.text)) <= 96
    with pytest.raises(UserError, match="no room"):
        fit_texts(smollm2_tokenizer, labels, docs, 8)


def test_scores_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    true = [0, 0, 1, 1, 2, 2, 2, 1]
    predicted = [0, 1, 1, 1, 2, 0, None, 1]  # None: an answer that names no label
    result = scores(true, predicted, ["a", "b", "c"])
    as_sklearn = [-1 if p is None else p for p in predicted]
    assert result["accuracy"] == sklearn_metrics.accuracy_score(true, as_sklearn)
    assert result["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(true, as_sklearn, labels=[0, 1, 2],
                                                                        average="macro"))
    assert result["confusion"] == sklearn_metrics.confusion_matrix(true, as_sklearn, labels=[0, 1, 2]).tolist()
    assert result["unanswered"] == 1


def test_parse_label():
    labels = ["business", "entertainment", "politics", "sports", "tech"]
    assert parse_label("Sports", labels) == 3
    assert parse_label("The category is technology.", labels) == 4
    assert parse_label("business or politics", labels) == 0  # the first one named
    assert parse_label("I cannot tell", labels) is None


def test_params_lora(capsys):
    assert main(["params", "smollm2-135m", "--lora", "8", "--seq-len", "256", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    full, lora = memory["training"], memory["training_lora"]
    # all 7 linears of 30 layers: 8 · (q 576+576, k 576+192, v 576+192, o 576+576, 2 x gate/up 576+1536,
    # down 1536+576) = 8 · 10,176 per layer
    assert lora["trainable"] == 30 * 8 * 10176 == 2_442_240
    assert lora["weights"] == full["weights"] and lora["optimizer"] == 8 * lora["trainable"]
    assert lora["total"] < full["total"] - 1.4 * 2**30  # no gradients or AdamW state for the 135M frozen
    assert main(["params", "smollm2-135m", "--lora", "8"]) == 0
    assert "training memory with LoRA rank 8 (2,442,240 trainable, 1.82% of all)" in capsys.readouterr().out


def test_finetune_flops_count_only_what_runs():
    """A full fine-tune with the LM head costs what pretraining does (6N + 12·L·C·T); LoRA on the top 10 of
    30 layers skips every weight gradient and the backward pass below them; a classifier skips the V-way head."""
    from minillama.config import preset
    from minillama.model.calc import finetune_flops_per_token, flops_per_token

    config = preset("smollm2-135m")
    full = finetune_flops_per_token(config, 256, 30, full=True, lm_head=True)
    assert full == pytest.approx(flops_per_token(config, 256))
    n_layer = 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536) / 30  # matmul weights of one layer
    head, attention = 49152 * 576, 4 * 576 * 256
    lora_top_10 = finetune_flops_per_token(config, 256, 10, full=False, lm_head=False)
    assert lora_top_10 == pytest.approx(2 * 30 * n_layer + 30 * attention + 2 * 10 * n_layer + 10 * 2 * attention)
    assert lora_top_10 < full / 2 and finetune_flops_per_token(config, 256, 30, False, True) - \
        finetune_flops_per_token(config, 256, 30, False, False) == pytest.approx(4 * head)
