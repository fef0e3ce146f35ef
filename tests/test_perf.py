"""Speed transforms against the plain model: the fp32 kernel and torch.compile agree to 1e-4 on tiny models;
bf16 and int8 on SmolLM2-135M keep greedy output and move perplexity by at most 1% and 2%."""

import copy

import pytest
import torch
from torch import nn

from minillama.config import GenerationConfig, preset
from minillama.evaluate.perplexity import perplexity
from minillama.infer.generate import generate_ids
from minillama.model import KVCache, Llama
from minillama.perf.compile import apply_compile
from minillama.perf.gemv import FastLinear, apply_fast_linear, linear_rows
from minillama.perf.quantize import Int8Linear, apply_bf16, apply_int8

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
    cache = KVCache(model.config, batch, 7 + steps)
    logits = [model(ids[:, :7], cache=cache)]
    for t in range(7, 7 + steps):
        logits.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(logits, dim=1)  # (B, 7 + steps, V)


# ---- fp32 decode kernel ----

@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_kernel_matches_float64_matmul(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 288, generator=g), torch.randn(1000, 288, generator=g)
    expected = (x.double() @ w.double().T).float()
    assert torch.allclose(linear_rows(x, w), expected, atol=1e-4, rtol=1e-5)


def test_fast_linear_equals_plain_model_and_keeps_weights_tied():
    plain = tiny(tie_embeddings=True)
    fast = apply_fast_linear(copy.deepcopy(plain))
    assert all(type(m) is not nn.Linear for m in fast.modules())
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # still tied, no copy
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for batch in (1, 3):  # decode steps and a 7-token prefill go through the kernel, a 3 x 7 one through F.linear
        assert torch.allclose(prefill_and_decode_logits(fast, batch=batch),
                              prefill_and_decode_logits(plain, batch=batch), atol=1e-4)
    prompts = [[5, 9, 200, 3], [7, 7, 1]]
    assert greedy(fast, prompts) == greedy(plain, prompts)


def test_fast_linear_falls_back_where_the_kernel_does_not_apply():
    for linear, x in [(nn.Linear(20, 30), torch.randn(2, 20)),  # 20 inputs: not a multiple of 16
                      (nn.Linear(32, 30), torch.randn(9, 32)),  # more than MAX_ROWS rows
                      (nn.Linear(32, 30).double(), torch.randn(1, 32, dtype=torch.float64))]:  # not fp32
        assert torch.equal(FastLinear.from_linear(linear)(x), linear(x))


# ---- int8 weight-only ----

def test_int8_linear_stores_int8_with_per_row_scales():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * torch.logspace(-3, 0, 48)[:, None])
    q = Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (48,)
    # each row is off by at most half a step of its own scale: small rows keep their precision
    row_max = linear.weight.abs().amax(1)
    assert ((q.weight - linear.weight).abs().amax(1) <= row_max / 127 * 0.51).all()
    for x in (torch.randn(3, 5, 64, generator=g), torch.randn(2, 20, 64, generator=g)):  # kernel; bf16 GEMM
        assert torch.allclose(q(x), linear(x), atol=2e-2 * linear(x).abs().max().item())


# ---- SmolLM2-135M: bf16 and int8 against fp32 ----

@pytest.fixture(scope="module")
def smollm2(smollm2_model, smollm2_tokenizer):  # conftest's, loaded once per session
    model, tokenizer = smollm2_model, smollm2_tokenizer
    ids = tokenizer.encode(TEXT)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    return model, ids, prompts, perplexity(model, ids, 128, 128)["perplexity"], greedy(model, prompts)


@torch.no_grad()
def decisive_prefix(model, prompt, tokens, margin=0.5):
    """How many of the greedy `tokens` fp32 chose by a clear margin (top-1 minus top-2 logit >= margin)
    before its first near-tie, where any rounding may legitimately flip the choice."""
    logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]  # (N, V): predicts each token
    top2 = logits.topk(2, dim=-1).values  # (N, 2)
    close = ((top2[:, 0] - top2[:, 1]) < margin).nonzero()
    return int(close[0]) if len(close) else len(tokens)


@pytest.mark.parametrize("transform,tolerance", [(apply_bf16, 0.01), (apply_int8, 0.02)])
def test_smollm2_low_precision_keeps_greedy_output_and_perplexity(smollm2, transform, tolerance):
    model, ids, prompts, fp32_ppl, fp32_tokens = smollm2
    low = transform(copy.deepcopy(model))
    ppl = perplexity(low, ids, 128, 128)["perplexity"]
    assert abs(ppl / fp32_ppl - 1) <= tolerance
    for prompt, expected, got in zip(prompts, fp32_tokens, greedy(low, prompts)):
        n = decisive_prefix(model, prompt, expected)
        assert n >= 4 and got[:n] == expected[:n]  # equal up to the first near-tie
    assert low.model.rope_cos.dtype == torch.float32  # rotary tables stay fp32


def test_bf16_weights_are_bf16():
    model = apply_bf16(tiny())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


# ---- torch.compile: compiled on a tiny model, equal to eager ----

def test_compiled_model_equals_eager():
    plain = tiny()
    compiled = apply_compile(apply_fast_linear(copy.deepcopy(plain)))
    assert torch.allclose(prefill_and_decode_logits(compiled), prefill_and_decode_logits(plain), atol=1e-4)
    prompts = [[5, 9, 200, 3], [7, 7, 1]]
    assert greedy(compiled, prompts) == greedy(plain, prompts)
