"""The model's own invariants: cache vs no cache, reference vs fused attention, batched vs alone,
left padding, the classification head, initialisation and config validation. Parity with
transformers lives in test_checkpoint.py (it goes through real checkpoint files)."""

import math

import pytest
import torch

from minillama.checkpoint.hf import config_from_hf, config_to_hf
from minillama.config import PRESETS, ModelConfig, RopeScaling, UserError, preset
from minillama.model import Llama, LlamaForSequenceClassification
from minillama.model.rope import rope_tables

CONFIGS = {
    "mha": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_seq_len=64),
    "gqa": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64),
    "mqa-tied": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=48,
                            max_seq_len=64, tie_embeddings=True),
    "qwen2-window": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                max_seq_len=64, qkv_bias=True, sliding_window=5, model_type="qwen2"),
    # model/moe.py and model/mla.py: experts with a gated shared expert; latent attention over a dense layer
    # and an MoE layer (its decode steps take the absorbed form, a full forward the plain one)
    "moe-shared": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                              max_seq_len=64, n_experts=4, expert_dim=16, norm_topk_prob=False,
                              shared_expert_dim=24, shared_expert_gate=True, qkv_bias=True, model_type="qwen2_moe"),
    "mla-moe": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_seq_len=64,
                           kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
                           n_experts=4, experts_per_token=3, expert_dim=16, first_dense_layers=1,
                           routed_scale=1.5, norm_topk_prob=False, model_type="deepseek_v2"),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    model = Llama(CONFIGS[name]).init_weights(seed).eval()
    if CONFIGS[name].qkv_bias:  # init zeroes biases; give them values so they are exercised
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.1)
                layer.self_attn.k_proj.bias.normal_(0, 0.1)
    return model


def left_padded(lengths, vocab, seed=0):
    """A batch of random prompts of the given lengths, left-padded with token 0: ids and mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def set_sdpa(model, on):
    for layer in model.model.layers:
        layer.self_attn.use_sdpa = on


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_and_fused_attention_agree(name):
    model = make(name)
    ids, mask = left_padded([9, 4, 12], model.config.vocab_size)
    with torch.no_grad():
        fused = model(ids, mask)
        set_sdpa(model, False)
        reference = model(ids, mask)
        unpadded_ref = model(ids[2:])
        set_sdpa(model, True)
        unpadded_fused = model(ids[2:])  # no mask at all: the is_causal fast path
    real = mask.bool()
    assert torch.allclose(fused[real], reference[real], atol=1e-5)
    assert torch.allclose(unpadded_fused, unpadded_ref, atol=1e-5)
    assert torch.isfinite(fused).all()  # padding rows too: they must not be NaN


@pytest.mark.parametrize("name", CONFIGS)
def test_cache_token_by_token_equals_full_forward(name):
    model = make(name)
    ids, mask = left_padded([10, 6], model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, mask)
        cache = model.new_cache(batch_size=2, max_len=16)
        # prefill a chunk, then one token at a time, as generation does
        steps = [model(ids[:, :5], mask[:, :5], cache)]
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], mask[:, t:t + 1], cache))
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    assert cache.length == ids.shape[1]
    assert torch.allclose(full[real], incremental[real], atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padded_batch_equals_one_by_one(name):
    model = make(name)
    lengths = [7, 3, 11]
    ids, mask = left_padded(lengths, model.config.vocab_size)
    with torch.no_grad():
        batched = model(ids, mask)
        for b, n in enumerate(lengths):
            alone = model(ids[b:b + 1, -n:])
            assert torch.allclose(batched[b, -n:], alone[0], atol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    model = make("qwen2-window")
    ids, _ = left_padded([12], model.config.vocab_size)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # information travels at most window-1 slots per layer: the last token (slot 11) is 11 slots away from slot 0,
    # more than 2 layers x 4, so it cannot see the change; the first tokens do
    assert torch.allclose(a[0, -1], b[0, -1], atol=1e-6)
    assert not torch.allclose(a[0, 1], b[0, 1], atol=1e-6)


def test_rope_scaling_methods():
    base = CONFIGS["mha"]
    cos, sin = rope_tables(base, 16)
    # rotate-half layout: both halves hold the same angles; position 0 is the identity rotation
    assert torch.equal(cos[:, :4], cos[:, 4:8]) and torch.allclose(cos[0], torch.ones(8))
    linear_cos, _ = rope_tables(base.replace(rope_scaling=RopeScaling("linear", 2.0)), 16)
    assert torch.allclose(linear_cos[6], cos[3], atol=1e-6)  # position interpolation: position 6 acts as 3
    ntk_cos, _ = rope_tables(base.replace(rope_scaling=RopeScaling("ntk", 4.0)), 16)
    # NTK-aware: the highest frequency (pair 0) is untouched, the lowest is slowed down
    assert torch.allclose(ntk_cos[:, 0], cos[:, 0]) and not torch.allclose(ntk_cos[:, 3], cos[:, 3])


def test_classification_head_pools_last_real_token():
    config = CONFIGS["gqa"]
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(config, num_labels=3).eval()
    ids, mask = left_padded([5, 8], config.vocab_size)
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    right_ids[0, :5], right_mask[0, :5] = ids[0, -5:], 1
    right_ids[1], right_mask[1] = ids[1], 1
    with torch.no_grad():
        left = clf(ids, mask)
        right = clf(right_ids, right_mask)
        alone = clf(ids[:1, -5:])
    assert left.shape == (2, 3)
    assert torch.allclose(left, right, atol=1e-5)  # left or right padding: same answer
    assert torch.allclose(left[0], alone[0], atol=1e-5)


def test_init_scales_residual_projections():
    config = ModelConfig(vocab_size=512, dim=256, n_layers=8, n_heads=4, hidden_dim=512, max_seq_len=32)
    model = Llama(config).init_weights(seed=0)
    layer = model.model.layers[0]
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    assert abs(layer.self_attn.q_proj.weight.std().item() - 0.02) < 0.001
    assert abs(layer.mlp.up_proj.weight.std().item() - 0.02) < 0.001
    assert abs(layer.self_attn.o_proj.weight.std().item() - residual_std) < 0.0005
    assert abs(layer.mlp.down_proj.weight.std().item() - residual_std) < 0.0005
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    seeded_again = Llama(config).init_weights(seed=0)
    assert torch.equal(seeded_again.lm_head.weight, model.lm_head.weight)


def test_tied_head_shares_the_embedding():
    model = Llama(CONFIGS["mqa-tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_validation_names_the_field():
    with pytest.raises(UserError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        ModelConfig(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(UserError, match="dim=50 is not divisible by n_heads=4"):
        ModelConfig(dim=50, n_heads=4)
    with pytest.raises(UserError, match="llama2-7b"):
        preset("llama2-8b")


def test_hf_config_round_trip():
    for name, config in PRESETS.items():
        again = config_from_hf(config_to_hf(config))
        assert config_to_hf(again) == config_to_hf(config), name  # hidden_dim comes back explicit, so compare resolved
        assert again.ffn_dim == config.ffn_dim


def test_llama2_hidden_size_rule():
    assert preset("llama2-7b").ffn_dim == 11008
    assert preset("llama2-13b").ffn_dim == 13824
    assert preset("llama2-70b").ffn_dim == 28672
    assert preset("stories15M").ffn_dim == 768
