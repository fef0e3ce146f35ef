"""Position encodings placed at attention time (model/positions.py) and the bounded SinkCache
(model/cache.py): ReRoPE and leaky ReRoPE against a plain O(T²) reference that rotates every query/key
pair by its clipped distance, ALiBi's slopes against transformers' BLOOM, and StreamingLLM's cache:
memory bounded however long generation runs, rows of a batch as they are alone."""

import math

import pytest
import torch

from minillama.config import GenerationConfig, ModelConfig, RopeScaling, UserError
from minillama.evaluate.perplexity import perplexity, streaming_perplexity
from minillama.infer.generate import generate_ids
from minillama.model import Llama
from minillama.model.positions import Positions, alibi_slopes, softmax_values
from minillama.model.rope import rotate_half, rotation

CONFIG = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=128)


def model_of(config, seed=0):
    torch.manual_seed(seed)
    model = Llama(config).init_weights(seed).eval()
    with torch.no_grad():  # larger q/k weights: positions then matter to the logits
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def random_ids(B, T, seed=0):
    return torch.randint(1, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- ReRoPE ----

def clipped_distance(t, window, k):
    """The notes' g(t): t inside the window; past it w (ReRoPE, k = inf) or w + (t - w)/k (leaky)."""
    return torch.where(t < window, t, window + (t - window) / k)


def pairwise_reference(self, q, k, v, mask, attention):
    """Positions.attend written out: each query rotated by the clipped distance to each key, the key left
    as projected (R(i)q · R(j)k = R(i - j)q · k), (B, H, T, S, D) at once. Patched in for the check."""
    s = self.config_scaling
    factor = s.factor if s.type == "leaky_rerope" else math.inf
    distance = clipped_distance((self.q_pos[:, :, None] - self.k_pos[:, None, :]).double(), s.window, factor)
    cos, sin = rotation(self.theta, distance)  # (B, T, S, D)
    B, H, T, D = q.shape
    q_pairs = q[:, :, :, None] * cos[:, None] + rotate_half(q)[:, :, :, None] * sin[:, None]  # (B, H, T, S, D)
    k_heads = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, S, D)
    scores = torch.einsum("bhtsd,bhsd->bhts", q_pairs, k_heads)  # (B, H, T, S)
    return softmax_values(scores.view(B, k.shape[1], H // k.shape[1], T, -1), v, mask)


@pytest.mark.parametrize("scaling", [RopeScaling("rerope", window=6), RopeScaling("leaky_rerope", 4.0, window=6)])
def test_rerope_equals_the_pairwise_reference_in_prefill_and_cached_decoding(scaling, monkeypatch):
    model = model_of(CONFIG.replace(rope_scaling=scaling))
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: distances count real tokens
    with torch.no_grad():
        fast_full = model(ids, mask)
        cache = model.new_cache(2, 40)
        fast_steps = [model(ids[:, :20], mask[:, :20], cache)]
        fast_steps += [model(ids[:, t:t + 1], mask[:, t:t + 1], cache) for t in range(20, 40)]
        plain = model_of(CONFIG)(ids, mask)  # plain RoPE: the clipping must make a difference
        monkeypatch.setattr(Positions, "config_scaling", scaling, raising=False)
        monkeypatch.setattr(Positions, "attend", pairwise_reference)
        reference = model(ids, mask)
    real = mask.bool()
    assert (fast_full - reference)[real].abs().max() <= 1e-4
    assert (torch.cat(fast_steps, dim=1) - reference)[real].abs().max() <= 1e-4
    assert (plain - reference)[real].abs().max() > 1e-2


def test_rerope_within_the_window_is_plain_rope():
    ids = random_ids(1, 30)
    with torch.no_grad():
        plain = model_of(CONFIG)(ids)
        wide = model_of(CONFIG.replace(rope_scaling=RopeScaling("rerope", window=30)))(ids)
    assert (plain - wide).abs().max() <= 1e-4


# ---- ALiBi ----

def test_alibi_slopes_equal_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (1, 2, 3, 4, 6, 8, 12, 16, 20, 32):
        bloom = build_alibi_tensor(torch.ones(1, 5), heads, torch.float32)  # (H, 1, 5): slope · key position
        assert torch.allclose(alibi_slopes(heads), bloom[:, 0, 1], atol=1e-7, rtol=0), heads


def test_alibi_bias_is_minus_slope_times_distance_and_the_model_has_no_rotation():
    config = CONFIG.replace(position_encoding="alibi")
    keys = torch.tensor([[False, False, True, True, True, True]])  # two padding slots
    positions = Positions(config, keys, T=2)
    mask = torch.ones(1, 1, 2, 6, dtype=torch.bool)
    bias = positions.alibi_bias(mask, torch.float32)  # (1, H, 2, 6)
    slopes = alibi_slopes(config.n_heads)
    # query positions 2 and 3; real keys at positions 0..3
    assert torch.allclose(bias[0, :, 1, 2:], -slopes[:, None] * torch.tensor([3.0, 2.0, 1.0, 0.0]))
    with pytest.raises(UserError, match="needs position_encoding rope"):
        config.replace(rope_scaling=RopeScaling("linear", 2.0))


def test_alibi_fused_and_reference_attention_agree():
    model = model_of(CONFIG.replace(position_encoding="alibi"))
    ids = random_ids(2, 16)
    with torch.no_grad():
        fused = model(ids)
        for layer in model.layers:
            layer.self_attn.use_sdpa = False
        reference = model(ids)
    assert (fused - reference).abs().max() <= 1e-5


# ---- attention sinks ----

def test_sink_cache_equals_kv_cache_until_full_and_then_keeps_sinks_and_window():
    model = model_of(CONFIG)
    ids = random_ids(1, 30)
    with torch.no_grad():
        cache = model.new_cache(1, 0, window=12, sink_tokens=4)  # 16 slots
        steps = [model(ids[:, :10], None, cache)] + [model(ids[:, t:t + 1], None, cache) for t in range(10, 30)]
        full = model(ids)
    assert (steps[0] - full[:, :10]).abs().max() <= 1e-4  # nothing evicted yet: plain attention
    # token 16 still sees all 17 (the cache holds 16 between steps, plus the step's own token)
    assert (torch.cat(steps[1:8], dim=1) - full[:, 10:17]).abs().max() <= 1e-4
    assert cache.length == 16 and int(cache.next_positions) == 16  # positions within the cache
    assert (torch.cat(steps[8:], dim=1) - full[:, 17:]).abs().max() > 1e-3  # now only sinks + window


def test_one_layer_sink_cache_step_equals_attending_to_sinks_and_window():
    """With one layer a token's keys depend on its embedding alone, so a step equals a plain forward over
    the sinks, the window and the new token, numbered from 0 as the paper does."""
    model = model_of(CONFIG.replace(n_layers=1))
    ids = random_ids(1, 40)
    with torch.no_grad():
        cache = model.new_cache(1, 0, window=10, sink_tokens=3)
        model(ids[:, :13], None, cache)
        for t in range(13, 40):
            step = model(ids[:, t:t + 1], None, cache)[:, -1]
            kept = torch.cat([ids[:, :3], ids[:, t - 10:t + 1]], dim=1)
            assert (step - model(kept)[:, -1]).abs().max() <= 1e-4, t


def test_generation_runs_far_past_the_context_with_a_bounded_cache():
    model = model_of(CONFIG.replace(max_seq_len=32))
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda *args, **kw: caches.append(new_cache(*args, **kw)) or caches[-1]
    lengths = []
    model.model.register_forward_pre_hook(lambda module, args: lengths.append(caches[-1].length))
    config = GenerationConfig(max_new_tokens=100, temperature=0, ignore_eos=True, window=16, sink_tokens=4)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    steps = list(generate_ids(model, prompts, config))
    assert len(steps) == 100 > 3 * model.config.max_seq_len
    assert len(lengths) == 100 and max(lengths) == 20  # the past each step reads: sinks + window, no more
    # rows of a batch (the second left-padded) generate what they generate alone
    for row, prompt in enumerate(prompts):
        alone = [step[0] for step in generate_ids(model, [prompt], config)]
        assert alone == [step[row] for step in steps]
    with pytest.raises(UserError, match="leave no room"):
        list(generate_ids(model, prompts, GenerationConfig(window=30, sink_tokens=4)))


def test_streaming_perplexity_equals_full_attention_while_the_text_fits():
    model = model_of(CONFIG)
    ids = random_ids(1, 60)[0]
    full = perplexity(model, ids, context=60, stride=60)
    assert streaming_perplexity(model, ids, window=100, sink_tokens=4)["perplexity"] == pytest.approx(
        full["perplexity"], rel=1e-5)
    short = streaming_perplexity(model, ids, window=8, sink_tokens=4)
    assert short["tokens"] == full["tokens"] and short["perplexity"] != pytest.approx(full["perplexity"], rel=1e-3)


def test_cli_streaming_flags_fail_in_one_line_before_loading(tmp_path, capsys):
    from minillama.cli import main

    text = tmp_path / "t.txt"
    text.write_text("some text to score")
    assert main(["eval", "no-such-model", "--text", str(text), "--window", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "window must be at least 1" in err
    assert main(["generate", "no-such-model", "--prompt", "hi", "--sink-tokens", "-1", "--window", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "sink_tokens must be >= 0" in err


@pytest.mark.slow  # three passes over 1,024 tokens with SmolLM2, two of them one token at a time
def test_smollm2_with_sinks_stays_near_full_attention_and_a_window_alone_does_not(smollm2_model, smollm2_tokenizer):
    """StreamingLLM's claim on a real model, a window far below SmolLM2's 8,192-token context: measured
    perplexity 26.4 (full attention), 28.5 (4 sinks + 124 recent tokens), 55.3 (the 128 recent alone)."""
    from minillama.data.corpus import load_corpus

    text = "\n\n".join(d.text for d in load_corpus("bbc-news")[:12])
    ids = smollm2_tokenizer.encode(text)[:1024]
    full = perplexity(smollm2_model, ids, context=1024, stride=1024)["perplexity"]
    sinks = streaming_perplexity(smollm2_model, ids, window=124, sink_tokens=4)["perplexity"]
    alone = streaming_perplexity(smollm2_model, ids, window=128, sink_tokens=0)["perplexity"]
    assert sinks < 1.15 * full and alone > 1.5 * sinks
