"""Experts and latent attention on the default (fast) loading path: perf/fast.make_fast fuses only layers of
llama.Attention with a dense MLP; an MoE or MLA layer keeps its reference forward, its matmuls FastLinear
over the same weights. A saved folder loaded by load_model_and_tokenizer must give the logits and the greedy
tokens of the same folder loaded with plain=True (every weight a float nn.Linear)."""

import pytest
import torch
from torch import nn

from minillama.checkpoint import load_model_and_tokenizer, save_model
from minillama.config import GenerationConfig, ModelConfig
from minillama.infer.generate import generate_ids
from minillama.model import Llama
from minillama.model.mla import LatentAttention
from minillama.model.moe import MoE
from minillama.perf import fast

# widths multiples of 32, so decode steps reach the C++ kernels (FastLinear) rather than falling back
BASE = dict(vocab_size=101, dim=64, n_layers=3, n_heads=4, hidden_dim=96, max_seq_len=64)
MLA = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
CONFIGS = {
    "mixtral": ModelConfig(**BASE, n_kv_heads=2, n_experts=4, experts_per_token=2, model_type="mixtral"),
    "qwen2-moe": ModelConfig(**BASE, n_kv_heads=2, n_experts=4, experts_per_token=2, expert_dim=32,
                             norm_topk_prob=False, shared_expert_dim=64, shared_expert_gate=True, qkv_bias=True,
                             model_type="qwen2_moe"),
    # layer 0: latent attention + dense MLP; layers 1-2: latent attention + experts with a shared one
    "deepseek-v2": ModelConfig(**BASE, **MLA, n_experts=4, experts_per_token=2, expert_dim=32, norm_topk_prob=False,
                               routed_scale=1.5, shared_expert_dim=64, first_dense_layers=1,
                               model_type="deepseek_v2"),
}
PROMPTS = [[5, 9, 20, 3, 8, 1, 2], [7, 7, 1], [4]]  # left-padded in one batch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


@pytest.fixture(scope="module", params=CONFIGS)
def loaded(request, tmp_path_factory):
    """(plain, fast) loads of one saved random-weight folder."""
    model = Llama(CONFIGS[request.param]).init_weights(seed=0).eval()
    with torch.no_grad():  # a visibly working router and shared-expert gate, not near-uniform logits
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.5)
    folder = save_model(model, tmp_path_factory.mktemp(request.param) / "model")
    load = lambda **kw: load_model_and_tokenizer(str(folder), tokenizer_required=False, **kw)[0]  # noqa: E731
    return load(plain=True), load(), load(dtype="bfloat16")


def greedy(model, n=10):
    out = [[] for _ in PROMPTS]
    for step in generate_ids(model, PROMPTS, GenerationConfig(max_new_tokens=n, temperature=0, ignore_eos=True)):
        for row, token in step.items():
            out[row].append(token)
    return out


@torch.no_grad()
def prefill_and_decode_logits(model, batch=3, steps=5):
    ids = torch.randint(0, 101, (batch, 7 + steps), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    cache = model.new_cache(batch, 7 + steps)
    logits = [model(ids[:, :7], mask[:, :7], cache)]
    for t in range(7, 7 + steps):
        logits.append(model(ids[:, t:t + 1], mask[:, t:t + 1], cache))
    return torch.cat(logits, dim=1)  # (B, 7 + steps, V)


def test_fast_path_keeps_experts_and_latent_attention_on_their_reference_forward(loaded):
    plain, quick, _ = loaded
    assert not any(type(m) is fast.FastLinear for m in plain.modules())
    assert all(type(m) is not nn.Linear for m in quick.modules())  # every matmul on the fast path
    for layer in quick.model.layers:
        special = isinstance(layer.self_attn, LatentAttention) or isinstance(layer.mlp, MoE)
        assert (type(layer) is fast.FastDecoderLayer) != special  # fused exactly the plain llama layers


def test_fast_path_equals_plain_load(loaded):
    plain, quick, _ = loaded
    torch.testing.assert_close(prefill_and_decode_logits(quick), prefill_and_decode_logits(plain),
                               atol=1e-4, rtol=1e-4)
    assert greedy(quick) == greedy(plain)


def test_bf16_weights_stay_close(loaded):
    plain, _, half = loaded
    assert any(p.dtype == torch.bfloat16 for p in half.parameters())
    logits, reference = prefill_and_decode_logits(half), prefill_and_decode_logits(plain)
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
