"""Generation: the cached generator against full recomputation, batched (left-padded) against one by one
on tiny random models and on SmolLM2, sampling masks on hand-made logits, seeds, stops, UTF-8-safe
streaming, and the CLI's handling of bad input."""

import json

import pytest
import torch
from torch import nn

from minillama import cli
from minillama.checkpoint.load import resolve_model_path
from minillama.config import GenerationConfig, ModelConfig, UserError
from minillama.infer import generate as gen
from minillama.infer import sampling
from minillama.infer import stream as text_layer
from minillama.infer.generate import generate_ids
from minillama.infer.sampling import filter_logits, sample
from minillama.infer.stream import IncrementalText
from minillama.model import KVCache, Llama

CONFIGS = {
    "gqa": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64),
    "mqa-tied": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=48,
                            max_seq_len=64, tie_embeddings=True),
    "qwen2-window": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                max_seq_len=64, qkv_bias=True, sliding_window=6, model_type="qwen2"),
    "moe": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                       n_experts=4, model_type="mixtral"),
    "mla": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_seq_len=64, kv_lora_rank=16,
                       qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, model_type="deepseek_v2"),
}
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0)


def tiny(name="gqa", seed=0):
    model = Llama(CONFIGS[name]).init_weights(seed).eval()
    # init_weights gives logits near-uniform; scale the head so greedy choices are far from ties
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        if CONFIGS[name].qkv_bias:
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.1)
    return model


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(model, prompts, config, stop_ids=frozenset()):
    """Generated ids per prompt."""
    out = [[] for _ in prompts]
    for step in generate_ids(model, prompts, config, stop_ids):
        for row, token in step.items():
            out[row].append(token)
    return out


class FakeTokenizer:
    """Bytes are ids 0-255, then <bos> 256, <eos> 257, <|im_end|> 258; decode replaces broken UTF-8."""
    SPECIAL = {256: "<bos>", 257: "<eos>", 258: "<|im_end|>"}
    eos_ids = {257, 258}
    vocab_size = 259

    def encode(self, text, bos=None, eos=False, special=False):
        return ([256] if bos is not False else []) + list(text.encode())

    def decode(self, ids):
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out += [buf.decode(errors="replace"), self.SPECIAL[i]]
                buf = bytearray()
        return "".join(out) + buf.decode(errors="replace")

    # what infer/templates.py reads: a jinja template and the special tokens
    chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    bos_token, eos_token = "<bos>", "<eos>"


class ScriptedModel(nn.Module):
    """Stands in for a Llama through the surface the generator uses (config, new_cache, hidden_states,
    logits): the n-th generated token of every row is script[n], whatever the prompt."""

    def __init__(self, script, vocab_size=259, max_seq_len=1024):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, dim=8, n_layers=1, n_heads=1, hidden_dim=8,
                                  max_seq_len=max_seq_len)
        self.script = list(script)
        self.cache, self.generated = None, 0  # the cache of the current generation; tokens since its prefill

    def new_cache(self, batch_size, max_len, window=None, sink_tokens=0):
        return KVCache(self.config, batch_size, max_len)

    def hidden_states(self, ids, mask, cache):
        B, T = ids.shape
        self.generated = self.generated + 1 if cache is self.cache else 0  # a new cache: a new prefill
        self.cache = cache
        h = torch.zeros(B, T, self.config.vocab_size)  # (B, T, V): one-hot hidden states are the logits
        h[:, -1, self.script[min(self.generated, len(self.script) - 1)]] = 1.0
        return h

    def logits(self, hidden):
        return hidden


def script_of(text, end=(257,)):
    return list(text.encode()) + list(end)


# ---- the cached generator is exact ----

def test_cached_generation_equals_full_recomputation(monkeypatch):
    model = tiny("gqa")
    seen_logits = []
    real_sample = gen.sample

    def recording_sample(logits, *args):
        seen_logits.append(logits.clone())
        return real_sample(logits, *args)

    monkeypatch.setattr(gen, "sample", recording_sample)
    prompt = random_prompts([7], 97)[0]
    tokens = run(model, [prompt], GREEDY)[0]
    assert len(tokens) == GREEDY.max_new_tokens
    ids = list(prompt)
    with torch.no_grad():
        for step, token in enumerate(tokens):
            full = model(torch.tensor([ids]))[0, -1]  # no cache: the whole sequence again
            assert torch.allclose(seen_logits[step][0], full, atol=1e-5)
            assert int(full.argmax()) == token
            ids.append(token)


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_left_padding_equals_one_by_one(name):
    model = tiny(name)
    prompts = random_prompts([3, 11, 1, 6], 97, seed=1)
    batched = run(model, prompts, GREEDY)
    alone = [run(model, [p], GREEDY)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(t) for t in alone}) > 1  # the rows really differ


def test_rows_finishing_early_leave_the_others_unchanged():
    model = tiny("gqa")
    prompts = random_prompts([5, 9, 2], 97, seed=2)
    full = run(model, prompts, GREEDY)
    stop = {full[0][3], full[2][1]}  # makes rows finish at different steps
    alone = [run(model, [p], GREEDY, stop)[0] for p in prompts]
    rows_per_call = []
    hidden_states = model.hidden_states

    def recording(ids, mask, cache):
        rows_per_call.append(ids.shape[0])
        return hidden_states(ids, mask, cache)

    model.hidden_states = recording
    assert run(model, prompts, GREEDY, stop) == alone
    assert alone[0] == full[0][:full[0].index(full[0][3])]
    assert any(len(a) < GREEDY.max_new_tokens for a in alone)
    # finished rows stop costing compute: each forward runs only the rows still generating
    still_going = [sum(len(a) >= n for a in alone) for n in range(1, GREEDY.max_new_tokens)]
    assert rows_per_call == [3] + [n for n in still_going if n > 0]


def test_repetition_penalty_batched_equals_one_by_one_and_changes_output():
    model = tiny("gqa")
    config = GenerationConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.5)
    prompts = random_prompts([4, 10], 97, seed=3)
    penalised = run(model, prompts, config)
    assert penalised == [run(model, [p], config)[0] for p in prompts]
    assert penalised != run(model, prompts, GREEDY)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny("gqa")
    prompts = random_prompts([4, 6], 97)
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=1)
    first, again = run(model, prompts, config), run(model, prompts, config)
    other = run(model, prompts, GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=2))
    assert first == again
    assert first != other


def test_timing_counts_tokens():
    model = tiny("gqa")
    timing = gen.Timing()
    list(generate_ids(model, random_prompts([3, 5], 97), GREEDY, timing=timing))
    assert timing.prefill_tokens == 8
    assert timing.decode_tokens == 2 * (GREEDY.max_new_tokens - 1)
    assert timing.prefill_tokens_per_s > 0 and timing.decode_tokens_per_s > 0


# ---- sample() on hand-made logits ----

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])  # row 1 = row 0 reversed


def kept(logits):
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def test_top_k_top_p_min_p_masks():
    logits = PROBS.log()
    assert kept(filter_logits(logits, top_k=2)) == [[0, 1], [2, 3]]
    assert kept(filter_logits(logits, top_k=4)) == [[0, 1, 2, 3]] * 2
    assert kept(filter_logits(logits, top_p=0.4)) == [[0], [3]]  # the best token alone has mass 0.5
    assert kept(filter_logits(logits, top_p=0.7)) == [[0, 1], [2, 3]]
    assert kept(filter_logits(logits, top_p=0.9)) == [[0, 1, 2], [1, 2, 3]]
    assert kept(filter_logits(logits, top_p=1.0)) == [[0, 1, 2, 3]] * 2
    assert kept(filter_logits(logits, min_p=0.5)) == [[0, 1], [2, 3]]  # floor 0.25
    assert kept(filter_logits(logits, min_p=0.25)) == [[0, 1, 2], [1, 2, 3]]  # floor 0.125
    assert kept(filter_logits(logits, top_k=3, top_p=0.7, min_p=0.5)) == [[0, 1], [2, 3]]
    # kept logits are untouched
    assert torch.equal(filter_logits(logits, top_k=2)[0, :2], logits[0, :2])


def test_sample_draws_only_from_the_kept_set_and_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = PROBS.log().repeat(200, 1)  # (400, 4)
    ids = sample(logits, GenerationConfig(temperature=1.0, top_p=0.7), g)
    assert set(ids[0::2].tolist()) == {0, 1} and set(ids[1::2].tolist()) == {2, 3}
    assert sample(PROBS.log(), GenerationConfig(temperature=0, top_k=1)).tolist() == [0, 3]
    # a low temperature sharpens toward the best token, a high one flattens
    cold = sample(logits, GenerationConfig(temperature=0.05), torch.Generator().manual_seed(0))
    assert cold[0::2].eq(0).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert sampling.apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    # penalty 4: token 0 goes 2 -> 0.5 and loses to the unseen token 2
    config = GenerationConfig(temperature=0, repetition_penalty=4.0)
    assert sample(logits, config, seen=seen).tolist() == [2]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", -0.1), ("min_p", 1.1),
    ("max_new_tokens", 0), ("repetition_penalty", 0.0), ("temperature", float("nan")),
])
def test_bad_generation_config_is_a_user_error(field, value):
    with pytest.raises(UserError, match=field):
        GenerationConfig(**{field: value})


def test_prompts_past_the_context_are_user_errors():
    model = tiny("gqa")  # max_seq_len 64
    with pytest.raises(UserError, match="context is 64 tokens"):
        list(generate_ids(model, [[1] * 64], GREEDY))
    with pytest.raises(UserError, match=r"max_new_tokens <= 4"):
        list(generate_ids(model, [[1] * 60], GREEDY))
    with pytest.raises(UserError, match="outside the vocabulary"):
        list(generate_ids(model, [[1, 97]], GREEDY))
    with pytest.raises(UserError, match="empty"):
        list(generate_ids(model, [[1], []], GREEDY))


# ---- the text layer: stop strings, EOS, UTF-8-safe streaming ----

def stream_texts(script, config=GREEDY, prompts=("hi",), tokenizer=None):
    """Pieces per row from a scripted model."""
    tokenizer = tokenizer or FakeTokenizer()
    pieces = list(text_layer.stream(ScriptedModel(script, tokenizer.vocab_size), tokenizer, list(prompts), config))
    return [[p for p in pieces if p.row == row] for row in range(len(prompts))]


def test_streaming_never_splits_a_character_and_reassembles_exactly():
    text = "你好，世界! 🌍👋🏽 naïve café 😀"
    config = GenerationConfig(max_new_tokens=200, temperature=0)
    pieces = stream_texts(script_of(text), config)[0]
    assert "".join(p.text for p in pieces) == text
    assert all("\ufffd" not in p.text for p in pieces)
    assert "" in [p.text for p in pieces]  # the first bytes of a character waited for the rest
    assert "你" in [p.text for p in pieces]  # ...and came out whole
    assert [p.token for p in pieces] == list(text.encode())  # EOS ends the row and is not emitted


def test_incremental_text_releases_a_broken_character_at_the_end():
    tokenizer = FakeTokenizer()
    t = IncrementalText(tokenizer.decode)
    pieces = [t.add(i) for i in b"ok\xe4\xbd"] + [t.finish()]  # a 3-byte character cut after 2 bytes
    assert pieces[:2] == ["o", "k"] and pieces[2:4] == ["", ""]
    assert "".join(pieces) == tokenizer.decode(list(b"ok\xe4\xbd"))


def test_stop_strings_end_the_text_before_them_and_hold_back_partial_matches():
    config = GenerationConfig(max_new_tokens=100, temperature=0, stop_strings=("User:", "###"))
    pieces = stream_texts(script_of("a Us b User: c ### d"), config)[0]
    assert "".join(p.text for p in pieces) == "a Us b "
    assert len(pieces) == len("a Us b User:")  # generation stopped at the token completing the stop string
    texts = [p.text for p in pieces]
    assert texts[2:5] == ["", "", "Us "]  # "U", "Us" might start "User:" until the space proves otherwise


def test_eos_stop_ids_ignore_eos_and_max_new_tokens():
    script = script_of("hi!", end=(258,)) + list(b"more") + [257]
    completions, _ = text_layer.generate(ScriptedModel(script), FakeTokenizer(), ["x"], GenerationConfig(temperature=0))
    assert completions[0].text == "hi!" and completions[0].finish_reason == "stop"
    config = GenerationConfig(temperature=0, stop_ids=(ord("!"),))
    assert text_layer.generate(ScriptedModel(script), FakeTokenizer(), ["x"], config)[0][0].text == "hi"
    config = GenerationConfig(temperature=0, ignore_eos=True, max_new_tokens=8)
    c = text_layer.generate(ScriptedModel(script), FakeTokenizer(), ["x"], config)[0][0]
    assert c.text == "hi!<|im_end|>more" and c.finish_reason == "length"


def test_stop_strings_in_a_batch_stop_only_their_row():
    config = GenerationConfig(max_new_tokens=30, temperature=0, stop_strings=("b",))
    rows = stream_texts(script_of("aabbcc"), config, prompts=("x", "longer prompt"))
    assert ["".join(p.text for p in r) for r in rows] == ["aa", "aa"]
    assert [len(r) for r in rows] == [3, 3]


# ---- command line on a tiny saved checkpoint ----

def byte_tokenizer():
    """A real minillama Tokenizer: byte-level BPE with no merges (ids 0-255) and <|endoftext|> = 256."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from minillama.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from minillama.checkpoint import save_model

    config = ModelConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                         max_seq_len=128, bos_token_id=None, eos_token_id=256)
    model = Llama(config).init_weights(0)
    return str(save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", byte_tokenizer()))


def cli_run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_batch_matches_single_prompt_runs(tiny_folder, capsys):
    args = ["generate", tiny_folder, "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos", "--json"]
    code, out, _ = cli_run(capsys, *args, "--prompt", "hi", "--prompt", "héllo there", "--prompt-ids", "1,2,3")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", "héllo there", [1, 2, 3]]
    assert all(len(r["tokens"]) == 6 and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
               for r in rows)
    code, out, _ = cli_run(capsys, *args, "--prompt", "héllo there")
    assert json.loads(out)["tokens"] == rows[1]["tokens"]
    code, out, err = cli_run(capsys, *args[:-1], "--stream", "--prompt", "héllo there")
    assert code == 0 and out == rows[1]["completion"] + "\n" and "decode" in err and "tok/s" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0 and "--temperature" in capsys.readouterr().out


def test_cli_prompt_ids_need_no_tokenizer(tiny_folder, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"  # the checkpoint without its tokenizer files
    shutil.copytree(tiny_folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    args = ["generate", "--max-new-tokens", "5", "--temperature", "0", "--ignore-eos", "--prompt-ids", "1,2,3"]
    code, out, err = cli_run(capsys, *args[:1], str(bare), *args[1:])
    assert code == 0 and "tok/s" in err
    ids = [int(i) for i in out.strip().split(",")]
    code, with_tokenizer, _ = cli_run(capsys, *args[:1], tiny_folder, *args[1:], "--json")
    assert ids == json.loads(with_tokenizer)["tokens"] and len(ids) == 5  # the same ids, printed as ids
    code, out, err = cli_run(capsys, "generate", str(bare), "--prompt", "hi")  # text does need one
    assert code == 2 and "no tokenizer" in err and len(err.strip().splitlines()) == 1


def test_resolve_model_path_knows_smollm2():
    from minillama.data.assets import smollm2_gguf

    assert resolve_model_path("smollm2") == smollm2_gguf()


@pytest.mark.parametrize("extra", [
    ["--prompt", "a", "--temperature", "-1"],
    ["--prompt", "a", "--top-p", "0"],
    ["--prompt", "a", "--top-p", "1.5"],
    ["--prompt", "a", "--top-k", "-3"],
    ["--prompt", "a", "--min-p", "2"],
    ["--prompt", "a", "--max-new-tokens", "0"],
    ["--prompt", "a", "--repetition-penalty", "0"],
    ["--prompt-ids", "1,x"],
    ["--prompt-ids", ","],
    ["--prompt-ids", "1,999"],
    [],
    ["--prompt", "a", "--prompt", "b", "--stream"],
    ["--prompt", "a" * 130],  # longer than the 128-token context
    ["--prompt", "a" * 100, "--max-new-tokens", "40"],  # prompt + new tokens past the context
], ids=lambda extra: " ".join(extra)[:30] or "no prompt")
def test_cli_bad_input_exits_2_with_one_line(tiny_folder, capsys, extra):
    code, out, err = cli_run(capsys, "generate", tiny_folder, "--max-new-tokens", "4", *extra)
    assert code == 2
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("minillama generate: error: ")


def test_cli_missing_model_exits_2(capsys):
    code, _, err = cli_run(capsys, "generate", "/nonexistent/model", "--prompt", "a")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not exist" in err


# ---- the real SmolLM2-135M-Instruct (GGUF) ----

@pytest.fixture(scope="module")
def smollm2(smollm2_model, smollm2_tokenizer):
    return smollm2_model, smollm2_tokenizer


def test_smollm2_batched_equals_one_by_one(smollm2):
    model, tokenizer = smollm2
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "1, 2, 3,"]
    config = GenerationConfig(max_new_tokens=16, temperature=0, ignore_eos=True)
    batched, _ = text_layer.generate(model, tokenizer, prompts, config)
    for prompt, c in zip(prompts, batched):
        alone, _ = text_layer.generate(model, tokenizer, [prompt], config)
        assert alone[0].tokens == c.tokens
        assert alone[0].text == c.text == tokenizer.decode(c.tokens)
    assert "Paris" in batched[0].text


def test_smollm2_tokenizer_streams_chinese_and_emoji_cleanly(smollm2):
    _, tokenizer = smollm2
    text = "北京是中国的首都。🐉🎉 Ça va? 日本語も。"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # byte-level BPE: many characters span several tokens
    config = GenerationConfig(max_new_tokens=len(ids), temperature=0)
    pieces = stream_texts(ids, config, tokenizer=tokenizer)[0]
    assert [p.token for p in pieces] == ids
    assert "".join(p.text for p in pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p.text for p in pieces)
