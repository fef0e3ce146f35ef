"""The fast path against its references: each C++ kernel against a float64 matmul of the dequantized
weights, GGUF blocks against gguf's own dequantizer, the fast model against the plain one (fp32 exact,
bf16 and Q4 within stated tolerances, Q8_0 greedy-identical), and SmolLM2's shipped Q4_1 file loaded
quantized, not dequantized."""

import copy

import pytest
import torch
from torch import nn

from minillama.config import GenerationConfig, preset
from minillama.evaluate.perplexity import perplexity
from minillama.infer.generate import generate_ids
from minillama.model import Llama
from minillama.perf import fast, kernels

TEXT = (
    "The old lighthouse keeper had lived on the island for forty years. Every evening he climbed the "
    "hundred and twelve steps to the lamp room, wiped the great lens with a soft cloth, and lit the wick. "
    "Ships passed in the night without knowing his name, but they trusted the light, and that was enough "
    "for him. In the winter the storms came from the north, and the waves broke over the rocks so high "
    "that the spray reached the windows of his kitchen. He kept a logbook of every storm: the date, the "
    "direction of the wind, the height of the sea, and the ships he had seen."
)
PROMPTS = ["The capital of France is", "One, two, three, four,"]


def tiny(seed=0, **changes):
    return Llama(preset("tiny").replace(**changes)).init_weights(seed=seed).eval()


def greedy(model, prompts, n=12):
    config = GenerationConfig(max_new_tokens=n, temperature=0, ignore_eos=True)
    out = [[] for _ in prompts]
    for step in generate_ids(model, prompts, config):
        for row, token in step.items():
            out[row].append(token)
    return out


@torch.no_grad()
def prefill_and_decode_logits(model, steps=5, batch=2):
    """Logits of a 7-token prefill and `steps` single-token decode steps: the paths a generator runs."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 7 + steps), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(batch, 7 + steps)
    logits = [model(ids[:, :7], cache=cache)]
    for t in range(7, 7 + steps):
        logits.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(logits, dim=1)  # (B, 7 + steps, V)


# ---- the kernels, one weight format at a time ----

def weights_as(kind, w):
    """(raw rows the kernel reads, the weights they stand for in fp32)."""
    if kind == "f32":
        return w, w
    if kind == "bf16":
        return w.bfloat16(), w.bfloat16().float()
    blocks = fast.quantize(w, kind)
    return blocks, fast.dequantize(blocks, kind)


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_kernel_matches_float64_matmul_of_its_weights(kind, rows):
    g = torch.Generator().manual_seed(rows)
    raw, w = weights_as(kind, torch.randn(1000, 288, generator=g))
    x = torch.randn(rows, 288, generator=g)  # 9 blocks: 4 pairs and an odd one, for the int8 path
    seen = kernels.round_activations(x) if kind.startswith("q4") and kernels.int8_dots() else x
    expected = (seen.double() @ w.double().T).float()
    assert torch.allclose(kernels.linear_rows(x, raw, kind, 1000), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "q4_1"])
def test_kernel_rows_of_a_batch_equal_each_row_alone(kind):
    """8 rows of K = 2048 (64 KB of activations: the kernel takes them 4 at a time, weight rows two by two)
    give, bit for bit, what each row gives alone: a batch does not change a row's numbers."""
    g = torch.Generator().manual_seed(1)
    raw, _ = weights_as(kind, torch.randn(100, 2048, generator=g))
    x = torch.randn(8, 2048, generator=g)
    alone = torch.cat([kernels.linear_rows(x[i:i + 1], raw, kind, 100) for i in range(8)])
    assert torch.equal(kernels.linear_rows(x, raw, kind, 100), alone)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_q4_kernels_integer_activations_stay_within_1e_4(kind):
    """With int8_dots() the Q4 kernels hold activations as d·(q1 + q2/254) (~15 bits): against fp32
    activations, outputs move by < 1e-4 of their largest value (measured ~3e-5)."""
    g = torch.Generator().manual_seed(0)
    raw, w = weights_as(kind, torch.randn(1000, 1536, generator=g))
    x = torch.randn(8, 1536, generator=g) * torch.rand(1536, generator=g) ** 4 * 30  # a few large channels
    expected = (x.double() @ w.double().T).float()
    error = (kernels.linear_rows(x, raw, kind, 1000) - expected).abs().max()
    assert error < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_dequantize_equals_gguf_reference(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    blocks = fast.quantize(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), kind)
    reference = dequantize(blocks.numpy(), GGMLQuantizationType[kind.upper()]).reshape(64, 256)
    assert torch.equal(fast.dequantize(blocks, kind), torch.from_numpy(reference))


def test_ggml_linear_decode_and_prefill_paths_agree():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    for kind, tolerance in (("q8_0", 1e-4), ("q4_1", 2e-2)):  # q4's prefill GEMM runs in bf16
        module = fast.GGMLLinear(fast.quantize(linear.weight, kind), kind, 256, linear.bias)
        reference = nn.Linear(256, 96)
        reference.weight.data, reference.bias = module.weight, linear.bias
        for rows in (1, 8, 40):  # kernel, kernel, dequantize + GEMM
            x = torch.randn(rows, 256, generator=g)
            y, ref = module(x), reference(x)
            assert torch.allclose(y, ref, atol=tolerance * ref.abs().max().item()), (kind, rows)


# ---- whole models: the fast path against the plain one ----

def test_make_fast_equals_plain_model_and_keeps_weights_tied():
    plain = tiny(tie_embeddings=True)
    quick = fast.make_fast(copy.deepcopy(plain))
    assert all(type(m) is not nn.Linear for m in quick.modules())
    assert quick.lm_head.weight is quick.model.embed_tokens.weight  # still tied, no copy
    assert quick.state_dict().keys() == plain.state_dict().keys()
    for batch in (1, 3):  # decode steps through the kernel; prefill through GEMM
        assert torch.allclose(prefill_and_decode_logits(quick, batch=batch),
                              prefill_and_decode_logits(plain, batch=batch), atol=1e-4)
    prompts = [[5, 9, 200, 3], [7, 7, 1]]
    assert greedy(quick, prompts) == greedy(plain, prompts)


@pytest.mark.parametrize("changes", [dict(qkv_bias=True, model_type="qwen2", sliding_window=5),
                                     dict(n_kv_heads=1, tie_embeddings=True)], ids=["qwen2-window", "mqa"])
def test_fused_decode_layer_equals_the_reference_with_padding(changes, monkeypatch):
    plain = tiny(**changes)
    if plain.config.qkv_bias:
        with torch.no_grad():
            for layer in plain.model.layers:
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    quick = fast.make_fast(copy.deepcopy(plain))
    assert all(type(layer) is fast.FastDecoderLayer for layer in quick.model.layers)
    assert type(quick.model) is fast.FastLlamaModel
    layer_steps = []  # decode steps that went layer by layer: none may, all layers run in one C++ call
    forward = fast.FastDecoderLayer.forward
    monkeypatch.setattr(fast.FastDecoderLayer, "forward", lambda self, x, *a: layer_steps.append(x.shape[1])
                        or forward(self, x, *a))
    prompts = [[5, 9, 200, 3, 8, 1, 2], [7, 7, 1], [4]]  # left-padded, past the window
    fused = greedy(quick, prompts, n=10)
    assert layer_steps and 1 not in layer_steps  # quick's prefills only; every decode step in decode_layers
    assert fused == greedy(plain, prompts, n=10)
    assert torch.allclose(prefill_and_decode_logits(quick, batch=3), prefill_and_decode_logits(plain, batch=3),
                          atol=1e-4)


def test_fused_layer_follows_weights_changed_after_make_fast():
    """The fused layer looks its weights up once; a cast or a replaced projection must still be seen."""
    plain = tiny()

    def bf16_fast():
        return fast.make_fast(fast.to_bf16_weights(copy.deepcopy(plain)))

    quick = fast.make_fast(copy.deepcopy(plain))
    prefill_and_decode_logits(quick)  # the decode plans are built
    fast.to_bf16_weights(quick)
    assert torch.equal(prefill_and_decode_logits(quick), prefill_and_decode_logits(bf16_fast()))
    fresh = bf16_fast()
    for model in (quick, fresh):  # quick's plans were built, fresh's not
        model.model.layers[1].mlp.down_proj = fast.FastLinear.from_linear(nn.Linear(plain.config.ffn_dim, plain.config.dim, bias=False))
        model.model.layers[1].mlp.down_proj.weight.data.zero_()
    assert torch.equal(prefill_and_decode_logits(quick), prefill_and_decode_logits(fresh))


def test_bf16_weights_keep_fp32_activations_and_stay_close():
    plain = tiny()
    half = fast.make_fast(fast.to_bf16_weights(copy.deepcopy(plain)))
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert half.model.norm.weight.dtype == torch.float32 and half.new_cache(1, 4).past_mask().device.type == "cpu"
    logits = prefill_and_decode_logits(half)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, prefill_and_decode_logits(plain), atol=0.05)


# ---- SmolLM2-135M: the shipped Q4_1 file, quantized on the fast path ----

@pytest.fixture(scope="module")
def smollm2(smollm2_model, smollm2_tokenizer):  # conftest's plain fp32 copy, loaded once per session
    model, tokenizer = smollm2_model, smollm2_tokenizer
    ids = tokenizer.encode(TEXT)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    return model, ids, prompts, perplexity(model, ids, 128, 128)["perplexity"], greedy(model, prompts)


@pytest.fixture(scope="module")
def smollm2_fast(smollm2_path):
    from minillama.checkpoint import load_model_and_tokenizer

    return load_model_and_tokenizer(str(smollm2_path))[0]


@torch.no_grad()
def decisive_prefix(model, prompt, tokens, margin=0.5):
    """How many of the greedy `tokens` fp32 chose by a clear margin (top-1 minus top-2 logit >= margin)
    before its first near-tie, where any rounding may legitimately flip the choice."""
    logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]  # (N, V): predicts each token
    top2 = logits.topk(2, dim=-1).values  # (N, 2)
    close = ((top2[:, 0] - top2[:, 1]) < margin).nonzero()
    return int(close[0]) if len(close) else len(tokens)


def test_smollm2_stays_in_its_blocks_and_its_bytes(smollm2_fast, smollm2_path):
    modules = dict(smollm2_fast.named_modules())
    assert type(modules["model.layers.0.self_attn.q_proj"]) is fast.GGMLLinear
    assert modules["model.layers.0.mlp.down_proj"].kind == "q4_1" and modules["lm_head"].kind == "q8_0"
    assert modules["lm_head"].blocks is modules["model.embed_tokens"].blocks  # tied: one copy
    unique = {t.data_ptr(): t for t in smollm2_fast.state_dict().values()}.values()  # the tied head once
    stored = sum(t.numel() * t.element_size() for t in unique)
    assert stored <= 1.02 * smollm2_path.stat().st_size  # the file's bytes, not 4.5x them in fp32


def test_smollm2_q4_1_fast_path_is_the_dequantized_model(smollm2, smollm2_fast):
    """Against the dequantized fp32 model. Decoding and prompts up to 128 tokens go through the kernels
    (Q4 weights times activations held as two int8 parts on VNNI CPUs): logits (spanning ~50) within 0.05,
    next-token KL < 1e-5 (measured 0.013, 5e-7). Longer inputs (evaluation) run a bf16 GEMM: within 2.5,
    0.2 on average, KL < 0.01 nats on average. Perplexity within 1%; greedy equal up to the first
    near-tie."""
    import torch.nn.functional as F

    def kl(a, b):
        return F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()

    model, ids, prompts, fp32_ppl, fp32_tokens = smollm2
    for batch in (1, 2):  # 7-token prefill and decode steps: all through the kernels
        ours, full = prefill_and_decode_logits(smollm2_fast, batch=batch), prefill_and_decode_logits(model, batch=batch)
        assert (ours - full).abs().max() < (0.05 if kernels.int8_dots() else 1e-3) and kl(ours, full) < 1e-5
    with torch.no_grad():  # 200 tokens (> KERNEL_ROWS): the bf16 GEMM
        x = torch.tensor([(ids * 2)[:200]])
        ours, full = smollm2_fast(x), model(x)
    assert (ours - full).abs().max() < 2.5 and (ours - full).abs().mean() < 0.2 and kl(ours, full) < 0.01
    assert abs(perplexity(smollm2_fast, ids, 128, 128)["perplexity"] / fp32_ppl - 1) < 0.01
    for prompt, expected, got in zip(prompts, fp32_tokens, greedy(smollm2_fast, prompts)):
        n = decisive_prefix(model, prompt, expected)
        assert n >= 4 and got[:n] == expected[:n]


def test_smollm2_q8_0_answers_exactly_as_its_fp32_reference(smollm2):
    """Quantized to Q8_0 here: the fast path (kernels, fp32 GEMM in prefill) against the plain fp32
    model holding the same dequantized weights: the same greedy tokens."""
    model, ids, prompts, _, _ = smollm2
    q8 = fast.quantize_model(copy.deepcopy(model), "q8_0")
    reference = copy.deepcopy(model)
    for name, module in q8.named_modules():
        if isinstance(module, fast.GGMLLinear):
            reference.get_submodule(name).weight = nn.Parameter(module.weight)
    assert greedy(q8, prompts, n=24) == greedy(reference, prompts, n=24)
