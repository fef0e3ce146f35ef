"""Latent attention (model/mla.py): the absorbed form equals the plain one (prefill, cached decoding,
gradients), the interleaved rotary embedding equals transformers' complex-number one, the cache holds only
latents and rope keys, and generation drops finished rows from it. Logits equal to transformers'
DeepseekV2 are in test_checkpoint.py; cache and padding invariants in test_model.py and test_generate.py."""

import pytest
import torch

from minillama.checkpoint.hf import config_from_hf, config_to_hf
from minillama.config import GenerationConfig, ModelConfig, RopeScaling, UserError, preset
from minillama.infer.generate import generate_ids
from minillama.model import Llama
from minillama.model.calc import kv_cache_bytes_per_token
from minillama.model.mla import LatentAttention, LatentCache, apply_rope_interleaved

MLA = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, hidden_dim=40, max_seq_len=32, kv_lora_rank=12,
           qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5, model_type="deepseek_v2")
CONFIGS = {"q_proj": ModelConfig(**MLA), "q_lora": ModelConfig(**MLA, q_lora_rank=10)}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def model_of(name, seed=0):
    model = Llama(CONFIGS[name]).init_weights(seed).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits far from ties, so generated tokens test something
        for layer in model.model.layers:  # norms off 1, so the latent norm's weights matter
            layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return model


def set_form(model, absorb):
    for layer in model.model.layers:
        layer.self_attn.absorb = absorb


def left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids, mask = torch.zeros(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:], mask[b, T - n:] = torch.randint(1, 61, (n,), generator=g), 1
    return ids, mask


def cached_logits(model, ids, mask, prefill=4):
    """Prefill `prefill` tokens, then one token at a time, as generation does: logits (B, T, V)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    steps = [model(ids[:, :prefill], mask[:, :prefill], cache)]
    steps += [model(ids[:, t:t + 1], mask[:, t:t + 1], cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_absorbed_form_equals_plain_form(name):
    model = model_of(name)
    ids, mask = left_padded([9, 3, 7])
    real = mask.bool()
    results = {}
    with torch.no_grad():
        for absorb in (False, True):
            set_form(model, absorb)
            results[absorb] = (model(ids, mask), cached_logits(model, ids, mask), model(ids[1:2, -3:]))
    for plain, absorbed in zip(results[False], results[True]):
        mask_of = real if plain.shape[0] == 3 else slice(None)
        torch.testing.assert_close(absorbed[mask_of], plain[mask_of], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[True][1][real], results[False][0][real], atol=1e-5, rtol=1e-5)


def test_absorbed_form_trains_like_the_plain_one():
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for absorb in (False, True):
        model = model_of("q_lora")
        set_form(model, absorb)
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_the_cheaper_form_is_chosen_by_shape():
    attention = LatentAttention(preset("deepseek-v2-lite").replace(n_layers=1, n_experts=0))
    assert attention.absorbed_is_cheaper(T=1, S=4096)  # decoding: fold the up-projection into the query
    assert not attention.absorbed_is_cheaper(T=4096, S=4096)  # prefill/training: expand the latents once


def test_interleaved_rope_equals_the_complex_rotation():
    """transformers' DeepseekV2 rotates (x[2i], x[2i+1]) as the complex number x[2i] + i·x[2i+1] times e^(iθ)."""
    from minillama.model.rope import rope_tables

    config = CONFIGS["q_proj"]
    cos, sin = rope_tables(config, 16)  # (16, Dr)
    positions = torch.tensor([[3, 0, 15]])
    x = torch.randn(1, 2, 3, config.qk_rope_head_dim)  # (B, heads, T, Dr)
    ours = apply_rope_interleaved(x, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, 4, 2).float() / 4)
    rotation = torch.polar(torch.ones(3, 2), positions[0, :, None].float() * inv_freq)  # (T, Dr/2)
    theirs = torch.view_as_real(torch.view_as_complex(x.reshape(1, 2, 3, 2, 2)) * rotation).flatten(3)
    torch.testing.assert_close(ours, theirs)


def test_cache_holds_only_latents_and_rope_keys():
    model = model_of("q_proj")
    cache = model.new_cache(3, 20)
    assert isinstance(cache, LatentCache)
    per_token = cache.nbytes / (3 * 20)  # 3 rows of 20 tokens
    assert per_token == 2 * (12 + 4) * 4 == kv_cache_bytes_per_token(model.config, "fp32")  # layers·(R + Dr)·fp32
    mha = model.config.replace(kv_lora_rank=None)  # 4 heads of 8 for keys and for values
    assert kv_cache_bytes_per_token(mha, "fp32") == 2 * 2 * 4 * 8 * 4


def test_latent_attention_takes_the_fixed_rotations_only():
    """Its cache keeps the rope keys rotated, so the scalings that fix each position's rotation work (cached
    decoding equals recomputing, and the scaling changes the logits); those placed at attention time (ALiBi,
    dynamic, ReRoPE), a SinkCache, and DeepSeek's YaRN (which also rescales the softmax) are refused."""
    config = CONFIGS["q_proj"]
    for bad in (dict(rope_scaling=RopeScaling("yarn", 4.0)), dict(position_encoding="alibi"),
                dict(rope_scaling=RopeScaling("dynamic", 2.0)), dict(rope_scaling=RopeScaling("rerope", window=4))):
        with pytest.raises(UserError, match="latent attention"):
            config.replace(**bad)
    deepseek = config_to_hf(config) | {"rope_scaling": {"type": "yarn", "factor": 40, "mscale": 0.707,
                                                        "mscale_all_dim": 0.707, "original_max_position_embeddings": 8}}
    with pytest.raises(UserError, match="config.json: latent attention.*yarn"):
        config_from_hf(deepseek)
    with pytest.raises(UserError, match="latent attention"):
        model_of("q_proj").new_cache(1, 16, window=8, sink_tokens=2)
    ids = torch.randint(1, 61, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = model_of("q_proj")(ids)
    model = Llama(config.replace(rope_scaling=RopeScaling("linear", 2.0))).init_weights(0).eval()
    model.load_state_dict(model_of("q_proj").state_dict())
    full = model(ids)
    cache = model.new_cache(1, 16)
    steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full[:, 1:], plain[:, 1:], atol=1e-3)


def test_generation_drops_finished_rows_from_the_latent_cache():
    model = model_of("q_lora")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (5, 2, 8)]
    greedy = GenerationConfig(max_new_tokens=8, temperature=0)

    def run(prompts, stop=frozenset()):
        out = [[] for _ in prompts]
        for step in generate_ids(model, prompts, greedy, stop):
            for row, token in step.items():
                out[row].append(token)
        return out

    full = run(prompts)
    stop = {full[1][2]}  # the second row finishes early; the others go on with a cache of fewer rows
    alone = [run([p], stop)[0] for p in prompts]
    assert run(prompts, stop) == alone and len(alone[1]) < 8 < len(alone[0]) + 1


def test_lab_attention_quick(tmp_path):
    from minillama.lab.attention import run

    results = run(tmp_path, quick=True)
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "attention.json").exists()
    rows = results["rows"]
    assert [r["attention"] for r in rows] == ["MHA", "GQA (2 kv heads)", "MQA", "MLA"]
    layers, heads, D = 2, 8, 8  # the quick size; fp32
    measured = [r["kv_bytes_per_token"] for r in rows]
    assert measured == [2 * layers * heads * D * 4, 2 * layers * 2 * D * 4, 2 * layers * D * 4, layers * 4.5 * D * 4]
    assert [r["cache_vs_mha"] for r in rows] == pytest.approx([1, heads / 2, heads, 2 * heads / 4.5])
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["steps"] > 0 and r["val_loss"] < 5.0
