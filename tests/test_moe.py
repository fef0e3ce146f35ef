"""Mixture of experts (model/moe.py): grouped dispatch against the dense definition, every expert's gradient,
the balance loss against transformers' and at its known values, the z-loss, and the router losses reaching
training. Logits equal to transformers' Mixtral / Qwen2-MoE / DeepSeek-V2 are in test_checkpoint.py;
cache, padding and batching invariants in test_model.py and test_generate.py; training runs in test_train.py."""

import math

import pytest
import torch

from minillama.config import ModelConfig, UserError
from minillama.model import Llama
from minillama.model.moe import MoE, expert_usage, load_balancing_loss, router_z_loss
from minillama.train.loss import CausalLMLoss

BASE = dict(vocab_size=61, dim=24, n_layers=2, n_heads=4, hidden_dim=40, max_seq_len=32, n_experts=5)
FLAVOURS = {  # the three routings transformers implements
    "mixtral": ModelConfig(**BASE, experts_per_token=2, model_type="mixtral"),
    "qwen2-moe": ModelConfig(**BASE, experts_per_token=3, expert_dim=16, norm_topk_prob=False, shared_expert_dim=20,
                             shared_expert_gate=True, qkv_bias=True, model_type="qwen2_moe"),
    "deepseek": ModelConfig(**BASE, experts_per_token=2, expert_dim=16, norm_topk_prob=False, routed_scale=2.5,
                            shared_expert_dim=32, first_dense_layers=1, kv_lora_rank=8, qk_rope_head_dim=4,
                            qk_nope_head_dim=6, v_head_dim=6, model_type="deepseek_v2"),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


def block(name, seed=0):
    torch.manual_seed(seed)
    moe = MoE(FLAVOURS[name])
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


@pytest.mark.parametrize("name", FLAVOURS)
def test_grouped_dispatch_equals_the_dense_definition(name):
    moe = block(name)
    x = torch.randn(3, 7, 24)
    grads = []
    outputs = []
    for grouped in (True, False):
        moe.use_grouped = grouped
        moe.zero_grad()
        y = moe(x)
        (y * torch.linspace(-1, 1, 24)).sum().backward()
        outputs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-5, msg=n)


def test_routing_follows_each_family():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    probs = logits.softmax(-1)[0]
    weights, chosen = block("mixtral").route(logits)  # top 2, renormalised to sum to 1
    assert chosen.tolist() == [[0, 1]]
    torch.testing.assert_close(weights[0], probs[:2] / probs[:2].sum())
    weights, chosen = block("qwen2-moe").route(logits)  # top 3, as the softmax gave them
    torch.testing.assert_close(weights[0], probs[:3])
    weights, _ = block("deepseek").route(logits)  # top 2, times the routed scale
    torch.testing.assert_close(weights[0], 2.5 * probs[:2])


def test_idle_experts_still_get_a_gradient():
    """DDP needs every parameter in every backward pass: an expert no token chose gets zeros, not None."""
    moe = block("mixtral")
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:2] = 5.0  # every token picks experts 0 and 1
    x = torch.rand(2, 6, 24)  # positive inputs: logits of experts 0 and 1 are largest
    moe(x).sum().backward()
    assert all(p.grad is not None for p in moe.parameters())
    assert torch.count_nonzero(moe.experts[3].down_proj.weight.grad) == 0
    assert torch.count_nonzero(moe.experts[0].down_proj.weight.grad) > 0


@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_equals_transformers(masked):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    B, T, E, k = 3, 5, 6, 2
    logits = [torch.randn(B * T, E) * 2 for _ in range(4)]  # four layers
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = mask[2, :1] = 0  # left padding
    ours = load_balancing_loss(logits, k, mask if masked else None)
    theirs = load_balancing_loss_func(tuple(logits), E, k, mask if masked else None)
    torch.testing.assert_close(ours, theirs)


def test_balance_loss_is_k_for_uniform_routing_and_grows_as_routing_collapses():
    E, k = 4, 2
    # each token prefers two experts; over the 4 tokens each expert is chosen twice (fₑ = k/E) and the mean
    # probabilities are equal (Pₑ = 1/E): perfectly balanced
    rotations = torch.stack([torch.tensor([3.0, 3.0, 0.0, 0.0]).roll(i) for i in range(E)])
    assert load_balancing_loss([rotations], k).item() == pytest.approx(k)
    collapsed = torch.tensor([[3.0, 3.0, 0.0, 0.0]]).repeat(E, 1)  # every token to experts 0 and 1
    assert load_balancing_loss([collapsed], k).item() > 1.8 * k
    assert expert_usage([collapsed], k).tolist() == [[0.5, 0.5, 0.0, 0.0]]
    assert expert_usage([rotations], k).tolist() == [[0.25] * 4]


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = [torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])]
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_training_loss_adds_the_router_losses_only_with_a_gradient():
    config = FLAVOURS["mixtral"].replace(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    inputs, targets = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0)).split([8, 1], dim=1)
    targets = torch.cat([inputs[:, 1:], targets], dim=1)
    model = Llama(config).init_weights(0)
    with torch.no_grad():
        lm_only = CausalLMLoss(model)(inputs, targets)  # evaluation: comparable to a dense model's loss
        logits = []
        model.hidden_states(inputs, router_logits=logits)
    assert len(logits) == 2 and logits[0].shape == (16, 5)  # a layer's (B·T, E)
    expected = lm_only + 0.1 * load_balancing_loss(logits, 2) + 0.01 * router_z_loss(logits)
    torch.testing.assert_close(CausalLMLoss(model)(inputs, targets), expected)

    def router_gradient(config):
        model = Llama(config).init_weights(0)
        CausalLMLoss(model)(inputs, targets).backward()
        return model.model.layers[0].mlp.gate.weight.grad

    # the router losses reach the router: its gradient differs from the language-model loss's alone
    assert not torch.allclose(router_gradient(config),
                              router_gradient(config.replace(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)))


@pytest.mark.parametrize("fields, message", [
    (dict(n_experts=4, experts_per_token=5), "experts_per_token"),
    (dict(n_experts=4, first_dense_layers=3), "first_dense_layers"),
    (dict(kv_lora_rank=8, qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(kv_lora_rank=8, n_kv_heads=2), "n_kv_heads"),
])
def test_bad_expert_and_latent_fields_name_themselves(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**(dict(vocab_size=61, dim=24, n_layers=2, n_heads=4) | fields))


def test_a_family_that_cannot_express_the_model_refuses_to_save_it():
    from minillama.checkpoint.hf import config_from_hf, config_to_hf

    with pytest.raises(UserError, match="llama config.json cannot express n_experts=5"):
        config_to_hf(FLAVOURS["mixtral"].replace(model_type="llama"))
    with pytest.raises(UserError, match="shared_expert_dim=20"):
        config_to_hf(FLAVOURS["qwen2-moe"].replace(model_type="mixtral", qkv_bias=False, norm_topk_prob=True))
    with pytest.raises(UserError, match="greedy"):
        config_from_hf(config_to_hf(FLAVOURS["deepseek"]) | {"topk_method": "group_limited_greedy"})


def test_lab_experts_quick(tmp_path, capsys):
    from minillama.lab.experts import run

    results = run(tmp_path, quick=True)
    assert (tmp_path / "experts.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "experts.json").exists()
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == ["dense", "moe", "moe, no balance loss"]
    dense, moe = rows["dense"], rows["moe"]
    assert moe["active"] == pytest.approx(dense["active"], rel=0.02)  # the same compute per token (+ the router)
    assert moe["params"] > 2 * dense["params"]  # 8 experts of half the width: 4x the MLP weights
    for row in rows.values():
        assert row["steps"] > 0 and row["val_loss"] < 5.0  # it learned: ln 256 = 5.55 nats/byte is uniform
    for name in ("moe", "moe, no balance loss"):
        step, usage = results["usage"][name][-1]
        assert torch.tensor(usage).sum(-1).tolist() == pytest.approx([1.0, 1.0])  # per layer, shares of all tokens
        assert 0.25 <= rows[name]["max_share"] <= 0.5  # top 2 of 8: at least even (2/8), at most every token
    assert "moe, no balance loss" in capsys.readouterr().out


def test_activation_checkpointing_keeps_the_router_losses():
    """Checkpointed layers recompute the routing in backward; the losses and updates stay the same floats."""
    from minillama.config import TrainConfig, preset
    from minillama.train.trainer import Trainer

    def run(**changes):
        trainer = Trainer(Llama(preset("tiny-moe")).init_weights(0),
                          TrainConfig(batch_size=4, max_steps=3, warmup_steps=0, **changes))
        batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
        return [trainer.train_step(batch)["loss"] for _ in range(3)]

    assert run(activation_checkpointing=True) == run()


def test_bench_moe_reports_the_ratio_of_its_measurements():
    """`minillama bench moe` on a small shape: transformers' Mixtral on our weights (it checks their logits
    agree), and ratios that follow from its own measurements (tests never assert wall time)."""
    pytest.importorskip("transformers")
    from minillama.bench.moe import bench_shape, run_bench

    result = run_bench(bench_shape(256, 1, vocab=512), batch=2, seq_len=16, steps=2, rounds=1)
    for kind in ("forward", "decode"):
        r = result[kind]
        assert r["minillama"] > 0 and r["transformers"] > 0
        assert r["ratio"] == pytest.approx(r["minillama"] / r["transformers"])
