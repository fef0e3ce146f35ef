"""`minillama lab long-context --quick` end to end (lab/long_context.py, lab/passkey.py): it trains, prints
the tables and writes the JSON and the PNG; the passkey data is what the standard test says."""

import json
import random

from minillama.cli import main
from minillama.lab import passkey
from minillama.lab.long_context import QUICK


def test_passkey_prompt_is_the_standard_one():
    prompt, key = passkey.example(200, random.Random(0))
    words = {i: w for w, i in passkey.VOCAB.items()}
    text = " ".join(words[i] for i in prompt)
    assert len(prompt) + len(key) == 200
    assert text.endswith("what is the pass key ? the pass key is")
    n = words[key[0]]
    assert f"the pass key is {n} . remember it . {n} is the pass key ." in text
    assert "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again ." in text


def test_lab_long_context_quick_runs_end_to_end(tmp_path, capsys):
    assert main(["lab", "long-context", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "validation perplexity" in out and "passkey retrieval accuracy" in out and "leaky ReRoPE" in out
    results = json.loads((tmp_path / "long-context.json").read_text())
    assert (tmp_path / "long-context.png").read_bytes()[:4] == b"\x89PNG"
    ppl = results["perplexity"]
    lengths = [str(m) for m in QUICK.multiples]
    assert set(ppl) == {"none", "PI", "NTK", "dynamic NTK", "YaRN", "truncation", "ReRoPE", "leaky ReRoPE",
                        "ALiBi", "PI + fine-tune"}
    assert all(list(row) == lengths for row in ppl.values())
    # a few seconds of training already beat uniform bytes (256) by far at the training length
    assert ppl["none"]["1"] < 40 and ppl["ALiBi"]["1"] < 40
    # every method equals plain RoPE at the training length, except ReRoPE's window (T/2) clipping already
    for method in ("PI", "NTK", "dynamic NTK", "YaRN", "leaky ReRoPE"):
        assert abs(ppl[method]["1"] - ppl["none"]["1"]) < 1e-3 * ppl["none"]["1"], method
    assert all(0 <= acc <= 1 for row in results["passkey"].values() for acc in row.values())
    assert results["plan"]["T"] == QUICK.T
