"""The paged KV cache and the continuous-batching engine, without HTTP: the paged cache agrees with the simple
one, a row's numbers do not depend on the batch, blocks come and go, and the engine's greedy answers equal
generate_ids on each prompt alone, whatever runs beside them."""

import threading
import time

import pytest
import torch

from minillama.config import GenerationConfig, ModelConfig, RopeScaling, UserError
from minillama.infer.engine import Engine, Request
from minillama.infer.generate import generate_ids
from minillama.model import Llama
from minillama.model.paged_cache import BLOCK_SIZE, BlockPool, PagedKVCache, PagedRow
from minillama.perf import fast
from test_generate import byte_tokenizer

# dims are multiples of 32, so every matmul of a decode step takes the C++ kernels (rows independent)
CONFIG = ModelConfig(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=256,
                     bos_token_id=None, eos_token_id=256)


def tiny_model(config=CONFIG):
    return fast.make_fast(Llama(config).init_weights(0).eval())


def test_block_pool_prefers_runs_and_reuses_freed_blocks():
    pool = BlockPool(CONFIG, 8)
    a, b = pool.allocate(2 * BLOCK_SIZE), pool.allocate(BLOCK_SIZE + 1)
    assert a == [0, 1] and b == [2, 3] and pool.free == [4, 5, 6, 7]
    pool.release(a)
    assert pool.allocate(3 * BLOCK_SIZE) == [4, 5, 6]  # the first run long enough, not 0, 1 + 7
    assert pool.allocate(3 * BLOCK_SIZE) == [0, 1, 7]  # no run left: any free blocks
    try:
        pool.allocate(1)
    except MemoryError:
        pass
    else:
        raise AssertionError("an empty pool gave a block")


@torch.inference_mode()
def test_paged_cache_matches_simple_cache_and_rows_do_not_depend_on_the_batch():
    """Prefill three prompts of different lengths one by one (scattered blocks for one of them), then decode
    them together: logits close to the simple cache's, and each row bit-equal to decoding it alone."""
    model = tiny_model(CONFIG.replace(sliding_window=6))
    prompts = [[5, 9, 33, 7], list(range(40, 61)), [100, 3]]
    pool = BlockPool(model.config, 16)
    rows = [PagedRow([0, 1]), PagedRow([9, 4]), PagedRow([2, 3])]  # [9, 4]: out of order, attention gathers
    for row, p in zip(rows, prompts):
        model.hidden_states(torch.tensor([p]), None, PagedKVCache(pool, [row]))
    step = torch.tensor([[11], [12], [13]])
    batched = model.logits(model.hidden_states(step, None, PagedKVCache(pool, rows))[:, -1])  # (3, V)
    for b, (row, p) in enumerate(zip(rows, prompts)):
        row.length -= 1  # forget the step and redo it alone
        alone = model.logits(model.hidden_states(step[b:b + 1], None, PagedKVCache(pool, [row]))[:, -1])
        assert torch.equal(alone[0], batched[b])
        cache = model.new_cache(1, 40)  # the simple cache, for the same tokens
        model(torch.tensor([p]), None, cache)
        simple = model(step[b:b + 1], None, cache)[:, -1]
        torch.testing.assert_close(simple[0], batched[b], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_paged_cache_kept_for_several_steps_equals_a_new_one_each_step():
    """The fused decode layer writes through write_rows, whose slots are looked up once per step: a
    PagedKVCache kept across steps (advance, then the next step) must not write into the last step's slots."""
    model = tiny_model()
    prompts = [[5, 9, 33, 7], list(range(40, 51))]
    logits = []
    for keep in (True, False):
        pool = BlockPool(model.config, 8)
        rows = [PagedRow(pool.allocate(20)) for _ in prompts]
        for row, p in zip(rows, prompts):
            model.hidden_states(torch.tensor([p]), None, PagedKVCache(pool, [row]))
        cache, steps = PagedKVCache(pool, rows), []
        for token in (11, 12, 13):
            cache = cache if keep else PagedKVCache(pool, rows)
            steps.append(model.logits(model.hidden_states(torch.tensor([[token]] * 2), None, cache)[:, -1]))
        logits.append(torch.stack(steps))
    assert torch.equal(logits[0], logits[1])


def ascii_stop(text: str) -> str:
    """A stop string the random model's answer holds: its first printable ASCII character after the third."""
    stop = next((c for c in text[3:] if c.isascii() and c.isprintable()), None)
    assert stop is not None, f"no ASCII character in {text!r}"
    return stop


def run_engine(engine, requests, stagger=0.0):
    """Submit the requests (from another thread, `stagger` seconds apart) and wait: [(tokens, text, done)]."""
    results = [([], [], None) for _ in requests]

    def emitter(i):
        def emit(event):
            if event.kind == "token":
                results[i][1].append(event.text)
                if event.token is not None:
                    results[i][0].append(event.token)
            else:
                results[i] = (results[i][0], results[i][1], event)
        return emit

    def submit():
        for i, r in enumerate(requests):
            engine.submit(r, emitter(i))
            time.sleep(stagger)

    threading.Thread(target=submit).start()
    deadline = time.time() + 120
    while any(r[2] is None for r in results) and time.time() < deadline:
        time.sleep(0.01)
    return [(tokens, "".join(text), done) for tokens, text, done in results]


@pytest.mark.parametrize("positions", [{"position_encoding": "alibi"}, {"rope_scaling": RopeScaling("dynamic", 2.0)}])
def test_engine_refuses_keys_placed_at_attention_time(positions):
    """The blocks keep keys rotated once; ALiBi, ReRoPE and length-dependent frequencies place them per step."""
    with pytest.raises(UserError, match="serve needs RoPE with fixed frequencies"):
        Engine(Llama(CONFIG.replace(**positions)), byte_tokenizer(), kv_cache_mb=1)


def test_engine_greedy_equals_each_prompt_alone_with_rows_coming_and_going():
    model, tokenizer = tiny_model(), byte_tokenizer()
    prompts = [tokenizer.encode(f"request {i}: " + "abc" * (i % 7)) for i in range(20)]
    configs = [GenerationConfig(max_new_tokens=4 + 5 * (i % 6), temperature=0, ignore_eos=True) for i in range(20)]
    alone = [[step[0] for step in generate_ids(model, [p], c)] for p, c in zip(prompts, configs)]
    # a small pool (some requests wait for blocks) and short prefill chunks (prompts take several steps)
    engine = Engine(model, tokenizer, kv_cache_mb=0.05, prefill_chunk=8).start()
    try:
        results = run_engine(engine, [Request(p, c) for p, c in zip(prompts, configs)], stagger=0.002)
    finally:
        engine.stop()
    assert [tokens for tokens, _, _ in results] == alone
    assert all(done.kind == "done" and done.finish_reason == "length" for _, _, done in results)
    assert [text for _, text, _ in results] == [tokenizer.decode(a) for a in alone]
    assert engine.stats["peak_running"] > 1 and engine.stats["finished"] == 20
    assert len(engine.pool.free) == engine.pool.n_blocks  # every block came back


def test_engine_serves_latent_attention_from_a_paged_pool_of_latent_rows():
    """DeepSeek-V2's MLA: the pool keeps one latent row per token (no values); each request alone answers
    as generate_ids, several together complete and hand every block back."""
    config = CONFIG.replace(n_kv_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                            model_type="deepseek_v2")
    model, tokenizer = tiny_model(config), byte_tokenizer()
    prompts = [tokenizer.encode(f"latent {i}: " + "xy" * i) for i in range(6)]
    configs = [GenerationConfig(max_new_tokens=3 + 2 * i, temperature=0, ignore_eos=True) for i in range(6)]
    alone = [[step[0] for step in generate_ids(model, [p], c)] for p, c in zip(prompts, configs)]
    engine = Engine(model, tokenizer, kv_cache_mb=0.05, max_running=1, prefill_chunk=8).start()
    try:  # one at a time: a row's numbers equal generate_ids'
        assert [tokens for tokens, _, _ in run_engine(engine, [Request(p, c) for p, c in zip(prompts, configs)])] \
            == alone
    finally:
        engine.stop()
    assert engine.pool.v == [] and engine.pool.k[0].shape[-1] == 32 + 16  # (1, N, BLOCK_SIZE, R + Dr)
    engine = Engine(model, tokenizer, kv_cache_mb=0.05).start()
    try:  # together: padded to one batch, so only the ends of the sums may differ
        results = run_engine(engine, [Request(p, c) for p, c in zip(prompts, configs)], stagger=0.002)
    finally:
        engine.stop()
    assert [len(tokens) for tokens, _, _ in results] == [len(a) for a in alone]
    assert all(done.kind == "done" for _, _, done in results) and len(engine.pool.free) == engine.pool.n_blocks


def test_engine_cancel_frees_the_slot_and_stop_strings_end_the_text():
    model, tokenizer = tiny_model(), byte_tokenizer()
    engine = Engine(model, tokenizer, kv_cache_mb=1, max_running=1).start()
    try:
        first = []
        seq = engine.submit(Request([1, 2, 3], GenerationConfig(max_new_tokens=250, temperature=0, ignore_eos=True)),
                            first.append)
        while not first:
            time.sleep(0.001)
        seq.cancel()
        [(tokens, text, done)] = run_engine(engine, [Request([1, 2, 3], GenerationConfig(
            max_new_tokens=30, temperature=0, ignore_eos=True))])  # runs only once the first left
        assert first[-1].finish_reason == "cancelled" and len(first) < 250
        stop = ascii_stop(text)
        cut = text.index(stop)
        [(_, stopped, done)] = run_engine(engine, [Request([1, 2, 3], GenerationConfig(
            max_new_tokens=30, temperature=0, ignore_eos=True, stop_strings=(stop,)))])
        assert stopped == text[:cut] and done.finish_reason == "stop"
    finally:
        engine.stop()
    assert engine.stats["cancelled"] == 1 and len(engine.pool.free) == engine.pool.n_blocks


def test_engine_on_smollm2s_fast_path_answers_as_minillama_generate(smollm2_path, monkeypatch):
    """SmolLM2's GGUF loaded as `minillama serve` loads it (load_model_and_tokenizer: Q4_1 blocks kept,
    FastDecoderLayer): prompts (five texts, one chat) sent together through the engine get the greedy tokens that
    infer.stream.generate (what `minillama generate` runs) gives each alone, and every decode step of the
    engine went through the fused layer (DecoderLayer.forward, the fallback, ran only prompt chunks)."""
    from minillama.checkpoint import load_model_and_tokenizer
    from minillama.infer.stream import generate
    from minillama.infer.templates import render_chat
    from minillama.model.llama import DecoderLayer

    model, tokenizer = load_model_and_tokenizer(str(smollm2_path))
    assert isinstance(model.layers[0], fast.FastDecoderLayer)
    assert isinstance(model.layers[0].self_attn.q_proj, fast.GGMLLinear)
    # short prompts (at most 8 tokens: their prefill takes the kernels too, not a dequantized GEMM, which
    # is slow on a busy machine) and one chat prompt through the checkpoint's template
    texts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Three colours:", "1, 2, 3,"]
    prompts = [tokenizer.encode(t) for t in texts]
    assert all(len(p) <= 8 for p in prompts)
    chat = render_chat(tokenizer, [{"role": "user", "content": "Who wrote Hamlet?"}])
    prompts.insert(2, tokenizer.encode(chat, bos=False, special=True))
    config = GenerationConfig(max_new_tokens=12, temperature=0)
    alone = [generate(model, tokenizer, [p], config)[0][0].tokens for p in prompts]

    original, steps = DecoderLayer.forward, []

    def counted(layer, x, *args, **kwargs):
        steps.append(x.shape[1])
        return original(layer, x, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "forward", counted)
    engine = Engine(model, tokenizer, kv_cache_mb=64).start()
    try:
        results = run_engine(engine, [Request(p, config) for p in prompts], stagger=0.01)
    finally:
        engine.stop()
    assert [tokens for tokens, _, _ in results] == alone
    assert engine.stats["peak_running"] > 1 and all(done.kind == "done" for _, _, done in results)
    assert steps and 1 not in steps  # the fallback saw prompt chunks only, never a decode step
