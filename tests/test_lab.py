"""`minillama lab`: the listing, the one-line error for an unknown experiment, and each experiment's --quick
run with the claims it checks (exact where the notes give numbers, directions where they are robust)."""

import copy
import json
import math

import pytest
import torch

from minillama.cli import main
from minillama.config import RopeScaling, preset
from minillama.lab import EXPERIMENTS
from minillama.model import Llama


def test_lab_lists_every_experiment(capsys):
    assert main(["lab"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)


def test_unknown_experiment_is_one_line(capsys):
    assert main(["lab", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillama lab: error: unknown experiment") and len(err.strip().splitlines()) == 1


# ---- each experiment's --quick run: the claims it checks, asserted where the result is robust ----

def written(out, name):
    """The JSON the run wrote (and its PNG exists)."""
    assert (out / f"{name}.png").stat().st_size > 1000
    return json.loads((out / f"{name}.json").read_text())


def test_temperature_reproduces_the_notes_exactly(tmp_path, smollm2_model, smollm2_tokenizer):
    from minillama.lab import temperature

    r = temperature.run(tmp_path, quick=True, model=smollm2_model, tokenizer=smollm2_tokenizer)
    rows = {row["T"]: row for row in r["notes_example"]}
    # the notes: 0.4/0.6 -> 0.31/0.69 at T=0.5, 0.12/0.88 at T=0.2, 0/1 at T=0 (002, lines 94-98)
    for T, (cheese, mouse) in {1.0: (0.40, 0.60), 0.5: (0.31, 0.69), 0.2: (0.12, 0.88), 0.0: (0.0, 1.0)}.items():
        assert (round(rows[T]["p(cheese)"], 2), round(rows[T]["p(mouse)"], 2)) == (cheese, mouse)
    assert rows[0.5]["p(cheese)"] == pytest.approx(0.16 / 0.52)  # 0.4² / (0.4² + 0.6²)
    assert rows[0.0]["drawn cheese"] == 0.0  # the real sampler at T = 0 is greedy
    assert all(abs(row["drawn cheese"] - row["p(cheese)"]) < 0.03 for row in rows.values())  # 4,000 draws
    entropies = [row["entropy bits"] for row in r["smollm2"]]
    assert entropies == sorted(entropies)  # entropy rises with T on the real distribution too
    cut = {row["cut-off"]: row for row in r["cutoffs"]}
    assert cut["top_k=20"]["tokens kept"] == 20 and cut["top_p=0.9"]["mass kept"] >= 0.9
    assert written(tmp_path, "temperature")["claim_held"]


def test_padding_left_equals_alone_right_breaks(tmp_path, smollm2_model, smollm2_tokenizer):
    from minillama.lab import padding

    r = padding.run(tmp_path, quick=True, model=smollm2_model, tokenizer=smollm2_tokenizer)
    assert r["left_equals_alone"] and r["generate_ids"] == r["alone"]
    longest = max(range(len(r["prompts"])), key=lambda b: len(smollm2_tokenizer.encode(r["prompts"][b])))
    assert r["right"][longest] == r["alone"][longest]  # a row without padding is unaffected
    assert r["right_rows_changed"] and longest not in r["right_rows_changed"]
    written(tmp_path, "padding")


def test_attention_maps_it_to_animal(tmp_path, smollm2_model, smollm2_tokenizer):
    from minillama.lab import attention_maps

    r = attention_maps.run(tmp_path, quick=True, model=smollm2_model, tokenizer=smollm2_tokenizer)
    assert r["it_unchanged_by_later_words"]  # a decoder's "it" cannot see "tired"
    assert r["heads_it_to_animal"] > 0 and r["heads"][0]["it->animal"] > 0.3
    assert len(r["heads"]) == 30 * 9
    written(tmp_path, "attention-maps")


@pytest.mark.parametrize("positions", [{}, {"position_encoding": "alibi"},
                                       {"rope_scaling": RopeScaling("rerope", window=4)}])
def test_attention_weights_are_the_models(positions):
    """The lab's weights, applied to the layer's own values, give the layer's own output (through SDPA),
    also when the keys are placed at attention time (ALiBi, ReRoPE: the layer gets a Positions)."""
    from minillama.lab.common import attention_weights

    model = Llama(preset("tiny").replace(n_kv_heads=4, **positions)).init_weights(0)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
             for layer in model.layers]
    weights = attention_weights(model, ids)  # (B, H, T, S) per layer, and the hooks see the same forward
    for hook in hooks:
        hook.remove()
    for w, (attn, x, out) in zip(weights, seen):
        B, T, _ = x.shape
        assert torch.allclose(w.sum(-1), torch.ones(B, attn.n_heads, T)) and w.triu(1).abs().max() == 0
        v = attn.v_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = (w @ v).transpose(1, 2).reshape(B, T, -1)
        assert torch.allclose(attn.o_proj(y), out, atol=1e-5)


def test_memory_13b_term_by_term(tmp_path):
    from minillama.lab import memory

    r = memory.run(tmp_path, quick=True)
    terms = {t["term"]: t for t in r["llama2_13b"]}
    C, F, L, V = 5120, 13824, 40, 32000  # 003, lines 35-102
    expected = {"embedding": V * C, "attention per layer": 4 * C * C, "mlp per layer": 3 * C * F,
                "norms per layer": 2 * C, "final norm": C, "lm head": C * V}
    assert expected["attention per layer"] == 104_857_600 and expected["mlp per layer"] == 212_336_640
    for name, value in expected.items():
        assert terms[name]["notes"] == terms[name]["calc"] == terms[name]["model"] == f"{value:,}"
    total = V * C + L * (4 * C * C + 3 * C * F + 2 * C) + C + C * V
    assert total == 13_015_864_320 and terms["total"]["model"] == f"{total:,}"
    (run,) = r["runs"]
    assert run["states_exact"]  # weights, gradients and AdamW state: exactly 4 + 4 + 8 bytes a parameter
    measured, predicted = run["measured"], run["predicted"]
    assert 0.9 < measured["activations_as_calc"] / predicted["activations"] < 1.3
    assert measured["activations_trainer"] < measured["activations_as_calc"]  # SDPA + chunked loss keep less
    if run["resident"] is not None:
        assert run["resident"]["step_peak"] > measured["activations_trainer"] / 2
    written(tmp_path, "memory")


def test_entropy_perplexity(tmp_path):
    from minillama.lab import entropy_perplexity

    r = entropy_perplexity.run(tmp_path, quick=True)
    computed = [e["computed"] for e in r["notes_examples"]]
    assert computed == pytest.approx([1.0, 0.46900, 3.0, 1.75, 2.25], abs=1e-5)
    rows = {m["model"]: m for m in r["models"]}
    assert r["identity_holds"] and rows["uniform"]["perplexity"] == pytest.approx(r["vocab_size"])
    bits = [rows[name]["bits/token"] for name in ("2-gram (Kneser-Ney)", "1-gram (Kneser-Ney)", "uniform")]
    assert bits[0] < bits[1] < bits[2]
    assert r["models"][-1]["bits/token"] < rows["uniform"]["bits/token"]  # the Llama learned something
    assert r["epsilon_mixture"]["within"] and r["epsilon_mixture"]["perplexity ratio"] > 1
    written(tmp_path, "entropy-perplexity")


def test_tokenizers(tmp_path):
    from minillama.lab import tokenizers

    r = tokenizers.run(tmp_path, quick=True)
    rows = {(t["corpus"], t["kind"]): t for t in r["tokenizers"]}
    assert all("error" not in t and t["lossless"] for t in rows.values())
    for kind in tokenizers.KINDS:  # Chinese: 3 bytes a character, and many characters left to bytes
        english, chinese = rows["shakespeare", kind], rows["people-daily", kind]
        assert chinese["tokens/byte"] < english["tokens/byte"]
        assert chinese["byte fallback"] > english["byte fallback"]
        assert math.isfinite(chinese["model bits/byte"]) and math.isfinite(english["model bits/byte"])
    written(tmp_path, "tokenizers")


def test_norm_variants_are_transforms():
    from minillama.lab.norms import variant

    base = Llama(preset("tiny")).init_weights(0)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(variant(base, "pre", "RMSNorm")(ids), base(ids))  # Llama itself
        for placement, norm in (("post", "RMSNorm"), ("sandwich", "RMSNorm"), ("pre", "LayerNorm")):
            model = variant(base, placement, norm)
            assert not torch.allclose(model(ids), base(ids))
            assert (norm == "LayerNorm") == any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert type(base.layers[0]).__name__ == "DecoderLayer"  # the base model is untouched


def test_norms(tmp_path):
    from minillama.lab import norms

    r = norms.run(tmp_path, quick=True)
    rms, layer = r["direction"]
    assert rms["min cosine(x, norm(x))"] == pytest.approx(1.0, abs=1e-5)  # RMSNorm only rescales (000, line 36)
    assert layer["min cosine(x, norm(x))"] < 0.99  # LayerNorm's centring turns the vector
    assert all(math.isfinite(run["val bits/byte"]) and run["val bits/byte"] < 8 for run in r["equal_budget"])
    written(tmp_path, "norms")


def test_without_scaling_is_scores_times_sqrt_d():
    """The unscaled transform equals the plain model with q_proj multiplied by √D."""
    from minillama.lab.attention_scale import without_scaling

    base = Llama(preset("tiny")).init_weights(0)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    scaled_weights = Llama(preset("tiny"))
    scaled_weights.load_state_dict(base.state_dict())
    with torch.no_grad():
        for layer in scaled_weights.layers:
            layer.self_attn.q_proj.weight.mul_(math.sqrt(layer.self_attn.head_dim))
        assert torch.allclose(without_scaling(copy.deepcopy(base))(ids), scaled_weights(ids), atol=1e-5)


def test_attention_scale(tmp_path):
    from minillama.lab import attention_scale

    r = attention_scale.run(tmp_path, quick=True)
    syn = {(row["D"], row["scaled"]): row for row in r["synthetic"]}
    dims = sorted({D for D, _ in syn})
    for D in dims:  # unit-variance q, k: q·k spreads like √D; divided by √D it stays at 1
        assert syn[D, False]["score std"] == pytest.approx(math.sqrt(D) * syn[D, True]["score std"], rel=0.01)
        assert 0.9 < syn[D, True]["score std"] < 1.1
        assert syn[D, False]["entropy bits"] < syn[D, True]["entropy bits"]
    saturated = [syn[D, False]["rows saturated"] for D in dims]
    assert saturated == sorted(saturated) and saturated[-1] > 0.3 and syn[dims[-1], True]["rows saturated"] == 0
    assert all(not run["diverged"] for run in r["training"])
    written(tmp_path, "attention-scale")


def test_guide_links_point_at_what_they_name():
    """Every link of docs/ to a file exists; a line anchor lies inside the file, and a link shown as `name`
    starts at the line that defines (or holds) that name, so moving code breaks this test, not the guide."""
    import re
    from pathlib import Path

    docs = Path(__file__).parent.parent / "docs"
    pages = sorted(docs.glob("*.md"))
    assert len(pages) >= 16  # the index and one page per topic
    link = re.compile(r"\[([^\]]*)\]\(([^)#\s]+)(?:#L(\d+)(?:-L(\d+))?)?\)")
    checked = 0
    for page in pages:
        for text, target, first, last in link.findall(page.read_text()):
            if target.startswith("http"):
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.name}: {target} does not exist"
            if not first:
                continue
            lines = path.read_text().splitlines()
            first, last = int(first), int(last or first)
            assert 1 <= first <= last <= len(lines), f"{page.name}: {target}#L{first}-L{last} is outside the file"
            if text.startswith("`") and text.endswith("`"):
                name = text.strip("`").split(".")[-1].removesuffix("()")
                assert name in lines[first - 1] or name in lines[first], \
                    f"{page.name}: {target}#L{first} should start at {name!r}, reads {lines[first - 1]!r}"
            checked += 1
    assert checked > 40
