"""RoPE length extension (model/rope.py, model/positions.py): frequencies and attention factors against
transformers' own functions, logits against transformers' Llama at 4x the trained length, rope_scaling
through a transformers save, and cached decoding equal to recomputing, for every method (dynamic NTK
included, where transformers' cached decoding is not)."""

import json

import pytest
import torch

from minillama.checkpoint import load_model, save_model
from minillama.checkpoint.hf import config_from_hf, config_to_hf
from minillama.config import ModelConfig, RopeScaling, UserError
from minillama.model import Llama
from minillama.model.rope import LENGTH_DEPENDENT, frequencies

transformers = pytest.importorskip("transformers")

TRAINED = 64  # the "original" context of the test models; they run at 4x it
BASE = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=96,
                   max_seq_len=4 * TRAINED)  # head_dim 32: 16 frequency pairs
LONG, SHORT = tuple(1.0 + 0.6 * i for i in range(16)), tuple(1.0 + 0.05 * i for i in range(16))
HF_METHODS = {  # every type transformers has
    "linear": RopeScaling("linear", 4.0),
    "dynamic": RopeScaling("dynamic", 4.0, original_max_seq_len=TRAINED),
    "yarn": RopeScaling("yarn", 4.0, original_max_seq_len=TRAINED),
    "yarn-deepseek": RopeScaling("yarn", 4.0, original_max_seq_len=TRAINED, mscale=0.707, mscale_all_dim=1.0,
                                 beta_fast=16.0, beta_slow=2.0, truncate=False),
    "llama3": RopeScaling("llama3", 4.0, original_max_seq_len=TRAINED, low_freq_factor=1.0, high_freq_factor=4.0),
    "longrope": RopeScaling("longrope", 4.0, original_max_seq_len=TRAINED, short_factor=SHORT, long_factor=LONG),
}
OURS_ONLY = {
    "ntk": RopeScaling("ntk", 4.0),
    "truncation": RopeScaling("truncation", low=0.01, high=0.1, beta=0.02),
    "rerope": RopeScaling("rerope", window=24),
    "leaky_rerope": RopeScaling("leaky_rerope", 8.0, window=24),
}


def model_with(scaling, seed=0, **changes):
    torch.manual_seed(seed)
    model = Llama(BASE.replace(rope_scaling=scaling, **changes)).init_weights(seed).eval()
    with torch.no_grad():  # larger q/k weights: positions then matter to the logits
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


@pytest.mark.parametrize("name", HF_METHODS)
def test_frequencies_and_attention_factor_equal_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = BASE.replace(rope_scaling=HF_METHODS[name])
    hf_config = transformers.LlamaConfig(**config_to_hf(config))
    for length in (None, TRAINED // 2, TRAINED + 1, 4 * TRAINED):  # dynamic and longrope depend on it
        theirs, their_factor = ROPE_INIT_FUNCTIONS[config.rope_scaling.type](hf_config, None, seq_len=length)
        ours, our_factor = frequencies(config, length)
        assert (ours - theirs.double()).abs().max() <= 1e-6
        assert our_factor == pytest.approx(their_factor, abs=1e-12)


def test_each_method_changes_the_frequencies_it_should():
    plain, _ = frequencies(BASE)
    linear, _ = frequencies(BASE.replace(rope_scaling=HF_METHODS["linear"]))
    assert torch.allclose(linear, plain / 4)  # position interpolation
    yarn, factor = frequencies(BASE.replace(rope_scaling=HF_METHODS["yarn"]))
    assert yarn[0] == plain[0] and torch.allclose(yarn[-1], plain[-1] / 4) and factor > 1  # a ramp between
    truncated, _ = frequencies(BASE.replace(rope_scaling=OURS_ONLY["truncation"]))
    assert set(truncated[plain >= 0.1].tolist()) == set(plain[plain >= 0.1].tolist())
    assert set(truncated[(plain < 0.1) & (plain >= 0.01)].tolist()) == {0.02}
    assert set(truncated[plain < 0.01].tolist()) == {0.0}
    dynamic = BASE.replace(rope_scaling=HF_METHODS["dynamic"])
    assert torch.equal(frequencies(dynamic, TRAINED)[0], plain)  # within the trained length: plain RoPE
    assert (frequencies(dynamic, 2 * TRAINED)[0][1:] < plain[1:]).all()  # past it: a larger base


@pytest.mark.parametrize("name", HF_METHODS)
def test_logits_equal_transformers_at_4x_and_rope_scaling_round_trips(name, tmp_path):
    # dynamic, longrope: transformers gives every token the frequencies of the whole pass, we (causal) those
    # of the token's own length; they agree on the last token, which in one layer reads only embeddings
    dependent = HF_METHODS[name].type in LENGTH_DEPENDENT
    layers, compared = (1, slice(-1, None)) if dependent else (2, slice(None))
    ours = model_with(HF_METHODS[name], n_layers=layers)
    save_model(ours, tmp_path / "ours")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    ids = torch.randint(0, BASE.vocab_size, (1, 4 * TRAINED), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits[:, compared]
        assert (ours(ids)[:, compared] - expected).abs().max() <= 1e-4
        # plain RoPE does not pass: the comparison has teeth
        assert (model_with(None, n_layers=layers)(ids)[:, compared] - expected).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "theirs")  # transformers 5 writes rope_parameters
    written = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert load_model(tmp_path / "theirs").config == ours.config
    assert config_to_hf(config_from_hf(written))["rope_scaling"] == config_to_hf(ours.config)["rope_scaling"]


@pytest.mark.parametrize("name", ["truncation", "rerope", "leaky_rerope", "alibi"])
def test_our_own_methods_round_trip_through_our_config_json(name):
    """transformers has none of these: written under its keys (it refuses the unknown rope types), read back."""
    config = BASE.replace(position_encoding="alibi") if name == "alibi" else \
        BASE.replace(rope_scaling=OURS_ONLY[name])
    assert config_from_hf(config_to_hf(config)) == config


def test_old_rope_scaling_spelling_and_bad_types_are_read():
    d = config_to_hf(BASE) | {"rope_scaling": {"type": "linear", "factor": 2.0}}  # transformers 4.x files
    assert config_from_hf(d).rope_scaling == RopeScaling("linear", 2.0)
    with pytest.raises(UserError, match="rope type 'su' is not supported"):
        config_from_hf(d | {"rope_scaling": {"type": "su", "factor": 2.0}})
    with pytest.raises(UserError, match="needs the field window"):
        BASE.replace(rope_scaling=RopeScaling("rerope"))
    assert BASE.replace(rope_scaling={"type": "linear", "factor": 2.0}).rope_scaling.factor == 2.0  # our JSON


def cached_steps(model, ids, mask, prefill, **sinks):
    """Logits of every step after the prefill, decoding one token at a time through a KV cache (a SinkCache
    given window= and sink_tokens=)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1], **sinks)
    steps = [model(ids[:, :prefill], mask[:, :prefill], cache)[:, -1]]
    for t in range(prefill, ids.shape[1] - 1):
        steps.append(model(ids[:, t:t + 1], mask[:, t:t + 1], cache)[:, -1])
    return steps  # steps[i] predicts token prefill + i


@pytest.mark.parametrize("name", [None, *HF_METHODS, *OURS_ONLY, "alibi"])
def test_cached_decoding_equals_recomputing_at_every_step(name):
    model = model_with(None, position_encoding="alibi") if name == "alibi" else \
        model_with({**HF_METHODS, **OURS_ONLY}.get(name))
    lengths, prefill = [TRAINED + 16, TRAINED + 6], TRAINED - 8  # past the trained length; left-padded
    T = max(lengths)
    ids = torch.randint(1, BASE.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :T - lengths[1]] = 0
    with torch.no_grad():
        steps = cached_steps(model, ids, mask, prefill)
        for i in [*range(0, len(steps), 4), len(steps) - 1]:  # recompute the whole prefix, no cache
            end = prefill + i
            full = model(ids[:, :end], mask[:, :end])[:, -1]
            assert (steps[i] - full).abs().max() <= 1e-4, f"step {i}"
        alone = model(ids[1:, T - lengths[1]:-1])[:, -1]  # the padded row equals itself alone
        assert (alone - steps[-1][1:]).abs().max() <= 1e-4


def test_transformers_dynamic_ntk_cache_disagrees_where_ours_agrees(tmp_path):
    """transformers #25104: its dynamic NTK rotates each cached key at the base of its own step, and a full
    pass gives every token the base of the whole length. Ours is causal (a token's query and the keys it
    reads use the base of the token's own length), so decoding equals recomputing."""
    ours = model_with(HF_METHODS["dynamic"])
    save_model(ours, tmp_path / "m")
    ids = torch.randint(0, BASE.vocab_size, (1, TRAINED + 24), generator=torch.Generator().manual_seed(2))
    prefill = TRAINED - 8
    mask = torch.ones_like(ids)
    with torch.no_grad():
        our_steps = cached_steps(ours, ids, mask, prefill)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
        out = theirs(ids[:, :prefill], use_cache=True)
        their_steps = [out.logits[:, -1]]
        for t in range(prefill, ids.shape[1] - 1):
            out = theirs(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            their_steps.append(out.logits[:, -1])
        last = ids.shape[1] - 1
        fresh = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731 (its base is stateful)
            tmp_path / "m", attn_implementation="eager")
        recomputed = fresh()(ids[:, :last]).logits[:, -1]
        assert (their_steps[-1] - recomputed).abs().max() > 1e-2  # transformers: cached != recomputed
        assert (our_steps[-1] - ours(ids[:, :last])[:, -1]).abs().max() <= 1e-4  # ours: equal
        # transformers' logits at a position change when tokens are appended after it; ours do not
        p = TRAINED + 8
        assert (fresh()(ids[:, :p + 1]).logits[:, p] - fresh()(ids).logits[:, p]).abs().max() > 1e-2
        assert (ours(ids[:, :p + 1])[:, p] - ours(ids)[:, p]).abs().max() <= 1e-5
    early = TRAINED - prefill - 1  # within the trained length the base never moved: all agree
    assert (their_steps[early] - our_steps[early]).abs().max() <= 1e-4


# ---- the default fast path (perf/fast.py) with every position encoding ----

FIXED = ("none", "linear", "yarn", "yarn-deepseek", "llama3", "ntk", "truncation")  # keys cached rotated


@pytest.mark.parametrize("name", ["none", *HF_METHODS, *OURS_ONLY, "alibi", "sinks"])
def test_fast_model_decodes_as_the_plain_one(name, monkeypatch):
    """make_fast's FastDecoderLayer rotates keys in C++ before the cache keeps them: right for fixed
    rotations in a KVCache, so its decode steps must run fused there and fall back to the reference for
    every encoding placed at attention time (dynamic NTK, longrope, ReRoPE, ALiBi, a SinkCache)."""
    from minillama.config import GenerationConfig
    from minillama.infer.generate import generate_ids
    from minillama.perf import fast

    scaling = {**HF_METHODS, **OURS_ONLY}.get(name)
    plain = model_with(None, position_encoding="alibi") if name == "alibi" else model_with(scaling)
    quick = fast.make_fast(model_with(None, position_encoding="alibi") if name == "alibi" else model_with(scaling))
    assert all(type(layer) is fast.FastDecoderLayer for layer in quick.model.layers)
    reference = []  # the number of new tokens of each call that fell back to DecoderLayer.forward
    forward = fast.DecoderLayer.forward
    monkeypatch.setattr(fast.DecoderLayer, "forward", lambda self, x, *a: reference.append(x.shape[1])
                        or forward(self, x, *a))
    sinks = dict(window=16, sink_tokens=4) if name == "sinks" else {}
    config = GenerationConfig(max_new_tokens=24, temperature=0, ignore_eos=True, **sinks)
    prompts = [torch.randint(1, BASE.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (TRAINED - 6, TRAINED - 13)]  # left-padded; decoding crosses the trained length
    steps = {}
    for label, model in (("quick", quick), ("plain", plain)):
        reference.clear()
        steps[label] = list(generate_ids(model, prompts, config))
        if label == "quick":
            assert (1 in reference) == (name not in FIXED), reference  # decode steps fused only when right
    assert steps["quick"] == steps["plain"]
    ids = torch.randint(1, BASE.vocab_size, (2, TRAINED + 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():  # logits of every decode step, left padding included
        fused, reference_steps = (torch.stack(cached_steps(m, ids, mask, TRAINED - 8, **sinks)) for m in (quick, plain))
        assert (fused - reference_steps).abs().max() <= 1e-4
