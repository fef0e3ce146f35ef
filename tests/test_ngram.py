"""The n-gram baseline: hand-computed add-one and interpolated Kneser-Ney values on a toy stream, agreement
with a slow dictionary-based modified Kneser-Ney written from Chen & Goodman's equations, proper
distributions for every kind of context, finite perplexity on unseen tokens, and the CLI."""

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillama.cli import main
from minillama.config import UserError
from minillama.evaluate.ngram import NGramLM

# bigrams: (0,1) x3, (1,2) x2, (2,0), (1,3), (3,0); left contexts of 0: {2, 3}, of 1: {0}, of 2, 3: {1}
TOY = [0, 1, 2, 0, 1, 3, 0, 1, 2]


def test_add_one_bigram_by_hand():
    lm = NGramLM(2, 4, "add-k", k=1.0).fit(TOY)
    # (c(hw) + 1) / (c(h.) + V): after 1 come 2 twice and 3 once, so c(1.) = 3
    assert lm.distribution([1]) == pytest.approx([1 / 7, 1 / 7, 3 / 7, 2 / 7])
    assert lm.distribution([3]) == pytest.approx([2 / 5, 1 / 5, 1 / 5, 1 / 5])
    assert lm.distribution([]) == pytest.approx([1 / 4] * 4)  # the stream's start: no context, uniform
    r = lm.perplexity([0, 1, 2])
    assert r["tokens"] == 2 and r["nll"] == pytest.approx(-math.log(4 / 7) - math.log(3 / 7))


def test_interpolated_kneser_ney_bigram_by_hand():
    lm = NGramLM(2, 4, "kn", discount=0.5).fit(TOY)
    # unigrams from continuation counts N1+(.w) = 2, 1, 1, 1 (total 5), discounted by 0.5, and the
    # freed mass 0.5 x 4 types spread uniformly: (N - 0.5 + 2 / 4) / 5
    unigram = [0.4, 0.2, 0.2, 0.2]
    assert lm.distribution([]) == pytest.approx(unigram)
    # after 1: counts 2 (w=2) and 1 (w=3), c(1.) = 3, gamma = 0.5 x 2 types
    expected = [(0 + 1 * u) / 3 for u in unigram]
    expected[2] += (2 - 0.5) / 3
    expected[3] += (1 - 0.5) / 3
    assert lm.distribution([1]) == pytest.approx(expected)
    assert lm.distribution([1])[2] == pytest.approx(1.7 / 3)
    r = lm.perplexity([0, 1, 2])  # p(1|0) = (3 - 0.5 + 0.5 x 0.2) / 3, p(2|1) = 1.7 / 3
    assert r["perplexity"] == pytest.approx(math.exp(-(math.log(2.6 / 3) + math.log(1.7 / 3)) / 2))


# ---- a slow reference: dictionaries and recursion, straight from the equations ----

def reference_kn(train: list[int], order: int, V: int):
    """p(w | context) of interpolated modified Kneser-Ney (Chen & Goodman 1998), one token at a time."""
    grams = [Counter(tuple(train[i:i + k]) for i in range(len(train) - k + 1)) for k in range(order + 1)]
    counts = {order: grams[order]}
    for k in range(1, order):  # continuation counts: distinct left extensions
        counts[k] = Counter(g[1:] for g in grams[k + 1])
    discounts = {}
    for k in range(1, order + 1):
        n = Counter(min(c, 5) for c in counts[k].values())
        y = n[1] / (n[1] + 2 * n[2]) if n[1] + 2 * n[2] else float("nan")
        d = []
        for r in (1, 2, 3):
            value = r - (r + 1) * y * n[r + 1] / n[r] if n[r] else float("nan")
            d.append(min(max(0.5 if math.isnan(value) else value, 0.05), r))
        discounts[k] = d
    by_context = {k: defaultdict(dict) for k in counts}
    for k, table in counts.items():
        for g, c in table.items():
            by_context[k][g[:-1]][g[-1]] = c

    def p(w, context, k=order):
        if k == 0:
            return 1 / V
        h = tuple(context[len(context) - (k - 1):]) if k > 1 else ()
        lower = p(w, context, k - 1)
        if len(h) < k - 1 or h not in by_context[k]:
            return lower
        seen = by_context[k][h]
        d = discounts[k]
        gamma = sum(d[min(c, 3) - 1] for c in seen.values())
        c = seen.get(w, 0)
        return (max(c - (d[min(c, 3) - 1] if c else 0), 0) + gamma * lower) / sum(seen.values())

    return p


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_modified_kneser_ney_matches_a_dictionary_reference(order):
    rng = np.random.default_rng(order)
    V = 12
    # skewed, repetitive text, so every count-of-counts class is populated; the held-out part has
    # contexts and tokens (11) that training never saw
    train = [int(t) for t in rng.zipf(1.6, 3000) % 11]
    held_out = [int(t) for t in rng.integers(0, V, 200)]
    lm = NGramLM(order, V).fit(train)
    p = reference_kn(train, order, V)
    expected = [math.log(p(held_out[i], held_out[max(0, i - order + 1):i])) for i in range(1, len(held_out))]
    assert lm.log_probs(held_out) == pytest.approx(expected, rel=1e-9)


# ---- properties ----

@settings(max_examples=30, deadline=None)
@given(order=st.integers(1, 4), smoothing=st.sampled_from(["kn", "add-k", "kn-fixed"]),
       train=st.lists(st.integers(0, 9), min_size=5, max_size=200),
       context=st.lists(st.integers(0, 9), max_size=4))
def test_every_context_gets_a_proper_distribution(order, smoothing, train, context):
    kwargs = {"discount": 0.75} if smoothing == "kn-fixed" else {"k": 0.5} if smoothing == "add-k" else {}
    lm = NGramLM(order, 10, smoothing.removesuffix("-fixed"), **kwargs).fit(train)
    probs = lm.distribution(context)
    assert probs.shape == (10,)
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)
    assert (probs > 0).all()  # never 0: below every order sits the uniform distribution


def test_repetitive_text_scores_far_below_uniform():
    pattern = [3, 1, 4, 1, 5, 9, 2, 6]
    lm = NGramLM(3, 64).fit(pattern * 200)
    assert lm.perplexity(pattern * 10)["perplexity"] < 1.5  # vs 64 for the uniform distribution
    assert lm.perplexity(list(range(64)))["perplexity"] > 10  # text unlike the training stream scores badly


def test_unseen_tokens_and_contexts_have_finite_perplexity():
    lm = NGramLM(4, 100).fit([1, 2, 3] * 50)
    r = lm.perplexity([50, 60, 70, 80, 90, 99, 0])  # none of these ever occurred
    assert math.isfinite(r["perplexity"]) and r["tokens"] == 6
    assert np.isfinite(lm.log_probs([1, 2, 99, 1, 2, 3])).all()


def test_large_stream_is_counted_in_one_pass():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2048, 1_000_000)
    lm = NGramLM(3, 2048).fit(ids)
    assert lm.orders[-1].counts.sum() == len(ids) - 2  # every trigram once
    assert math.isfinite(lm.perplexity(ids[:10_000])["perplexity"])


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="order <= 5"):
        NGramLM(6, 2048)
    with pytest.raises(UserError, match="outside the vocabulary"):
        NGramLM(2, 10).fit([1, 2, 10])
    with pytest.raises(UserError, match="smoothing"):
        NGramLM(2, 10, "witten-bell")
    with pytest.raises(UserError, match="not fitted"):
        NGramLM(2, 10).perplexity([1, 2, 3])


# ---- command line ----

class DigitTokenizer:
    """Each character a token: 0-9 are the digits, 10 BOS, 11 EOS."""
    bos_id, eos_id, vocab_size = 10, 11, 12

    def encode(self, text, bos=True, eos=True):
        return [10] * bos + [int(c) for c in text] + [11] * eos


def test_cli_prints_the_perplexity_of_each_order(tmp_path, capsys):
    from minillama.data.shards import write_shards

    write_shards(["0123456789" * 30] * 5, DigitTokenizer(), tmp_path / "data" / "train", workers=1)
    write_shards(["0123456789" * 3], DigitTokenizer(), tmp_path / "data" / "val", workers=1)
    assert main(["ngram", str(tmp_path), "--order", "1", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["1-gram", "3-gram"]
    unigram, trigram = (float(line.split("perplexity ")[1].split()[0]) for line in lines)
    assert trigram < 1.5 < unigram and "over 31 tokens" in lines[1]


def test_cli_without_shards_is_a_user_error(tmp_path, capsys):
    assert main(["ngram", str(tmp_path)]) == 2
    assert "no train/ and val/ token shards" in capsys.readouterr().err
