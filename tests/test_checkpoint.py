"""Checkpoints against an independent reader: transformers. Random tiny models of every family go through
real files (HF safetensors, GGUF written with the gguf package, a Meta-layout .pth) and must give
transformers' logits; SmolLM2-135M's Q4_1 GGUF must give the logits transformers reads from it."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from minillama.checkpoint import load_config, load_model, save_model
from minillama.cli import main
from minillama.config import ModelConfig, RopeScaling, UserError
from minillama.model import Llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
HF_CONFIGS = {
    "llama-mha-untied": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-gqa-tied": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-bias": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False,
                                                   use_sliding_window=False),
    "mistral-window": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=4,
                                                         tie_word_embeddings=False),
    # mixtures of experts (model/moe.py) and latent attention (model/mla.py)
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2-moe-shared": lambda: transformers.Qwen2MoeConfig(
        **TINY, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=False, tie_word_embeddings=False),
    "deepseek-v2-mla-moe": lambda: transformers.DeepseekV2Config(
        **TINY, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
        n_routed_experts=4, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=2,
        first_k_dense_replace=1, routed_scaling_factor=1.5, tie_word_embeddings=False),
    "deepseek-v2-mla-dense": lambda: transformers.DeepseekV2Config(
        **TINY, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
        first_k_dense_replace=2, num_experts_per_tok=2, tie_word_embeddings=True),
}


def hf_model(name, seed=0):
    """A transformers model of a tiny config with random weights everywhere (norms near 1, biases too)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name](), attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in pname else 0.1 * noise)
    return model.eval()


def batch(vocab=101):
    """Left-padded prompts of lengths 9, 4 and 12 (longer than Mistral's window of 4): ids, mask (B, T)."""
    g = torch.Generator().manual_seed(1)
    lengths, T = [9, 4, 12], 12
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


@torch.no_grad()
def hf_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # HF counts positions from the slot otherwise
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@torch.no_grad()
def max_diff(ours, reference, ids, mask):
    """Largest |difference| of logits at real-token positions (padding rows are garbage in both)."""
    real = mask.bool()
    return (ours(ids, mask)[real] - hf_logits(reference, ids, mask)[real]).abs().max().item()


# ---- Hugging Face folders, both ways ----

@pytest.mark.parametrize("name", HF_CONFIGS)
def test_hf_folder_loads_with_transformers_logits_and_saves_back(name, tmp_path):
    reference = hf_model(name)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert not ours.training and ours.config.tie_embeddings == reference.config.tie_word_embeddings
    ids, mask = batch()
    assert max_diff(ours, reference, ids, mask) < 1e-4

    save_model(ours, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(again) is type(reference)
    assert max_diff(ours, again.eval(), ids, mask) < 1e-4
    assert (tmp_path / "ours" / "generation_config.json").exists()
    if ours.config.tie_embeddings:  # like HF, the tied copy is not written
        from safetensors import safe_open
        with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_sharded_save_round_trip_and_replacing_a_checkpoint(tmp_path):
    reference = hf_model("llama-gqa-tied")
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    folder = tmp_path / "sharded"
    save_model(load_model(tmp_path / "hf", dtype=torch.bfloat16), folder)  # something to replace
    save_model(ours, folder, max_shard_size=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (folder / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "sharded"]  # no temporary or old folder left
    back = load_model(folder)
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tied again after loading
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = batch()
    assert max_diff(back, hf, ids, mask) < 1e-4


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    class FullDisk:
        def save(self, folder):
            raise OSError("no space left on device")

    hf_model("llama-gqa-tied").save_pretrained(tmp_path / "hf")
    old = load_model(tmp_path / "hf")
    save_model(old, tmp_path / "ckpt")
    new = load_model(tmp_path / "hf", dtype=torch.bfloat16)
    with pytest.raises(OSError, match="no space"):
        save_model(new, tmp_path / "ckpt", tokenizer=FullDisk())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]
    assert load_model(tmp_path / "ckpt").model.norm.weight.dtype == torch.float32  # still the old one


def test_ntk_scaled_model_round_trips(tmp_path):
    """HF has no static NTK scaling: save_model writes the raised base, which is the same rotation."""
    config = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=64,
                         rope_scaling=RopeScaling("ntk", 4.0))
    model = Llama(config).init_weights(0).eval()
    save_model(model, tmp_path / "m")
    ids, mask = batch()
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "m")(ids, mask), model(ids, mask), atol=1e-6)


def test_load_in_bfloat16_and_config_only(tmp_path):
    hf_model("qwen2-bias").save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_config(tmp_path) == model.config and model.config.qkv_bias


def test_pytorch_model_bin_folder(tmp_path):
    reference = hf_model("llama-mha-untied")
    reference.config.save_pretrained(tmp_path)
    # older exports also pickle the rotary table, which we recompute
    state = reference.state_dict() | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ids, mask = batch()
    assert max_diff(load_model(tmp_path), reference, ids, mask) < 1e-4


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    hf_model("llama-gqa-tied").save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="not a checkpoint folder"):
        save_model(load_model(tmp_path / "hf"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "precious"


# ---- GGUF ----

def permute_like_llama_cpp(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# one quantization type per kind of tensor, so every dequantizer we promise is exercised
Q = gguf.GGMLQuantizationType
GGUF_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.BF16, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16,
              "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1, "output": Q.F16}
GGUF_NAMES = {"embed_tokens": "token_embd", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
              "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "lm_head": "output"}


def write_gguf(reference, path, arch):
    """Write `reference` as llama.cpp would (names, q/k permutation for llama, quantized), then replace its
    weights by what the file holds after dequantization, so it stays the exact reference."""
    c = reference.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = reference.state_dict()
    if c.tie_word_embeddings:
        del state["lm_head.weight"]
    for name, t in state.items():
        parts = name.replace("model.", "").split(".")  # layers.0.self_attn.q_proj.weight / norm.weight
        if parts[0] == "layers":
            gname = f"blk.{parts[1]}.{GGUF_NAMES[parts[-2]]}.{parts[-1]}"
        else:
            gname = {"norm": "output_norm"}.get(parts[0], GGUF_NAMES.get(parts[0])) + "." + parts[-1]
        w = t.numpy()
        heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}.get(gname.split(".")[-2])
        if arch == "llama" and heads:
            w = permute_like_llama_cpp(w, heads)
        qtype = GGUF_TYPES.get(gname.split(".")[-2], Q.F32) if t.ndim == 2 else Q.F32
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(gname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        stored = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(w.shape).copy())
        if arch == "llama" and heads:
            stored = unpermute(stored, heads)
        with torch.no_grad():
            state[name].copy_(stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def unpermute(w, n_head):
    """transformers' GGUF reader's reverse permutation (integrations: _reverse_permute_weights)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("name,arch", [("llama-gqa-tied", "llama"), ("llama-mha-untied", "llama"),
                                       ("qwen2-bias", "qwen2")])
def test_gguf_of_every_quant_type_loads_with_the_dequantized_logits(name, arch, tmp_path):
    reference = hf_model(name)
    write_gguf(reference, tmp_path / "m.gguf", arch)
    ours = load_model(tmp_path / "m.gguf")
    assert ours.config.tie_embeddings == reference.config.tie_word_embeddings
    assert ours.config.model_type == arch and ours.config.eos_token_id == 2
    ids, mask = batch()
    assert max_diff(ours, reference, ids, mask) < 1e-4


def test_smollm2_q4_1_gguf_matches_transformers_reading_of_it(smollm2_model, hf_smollm2):
    ours, reference = smollm2_model, hf_smollm2
    assert ours.config.n_layers == 30 and ours.config.n_kv_heads == 3 and ours.config.tie_embeddings
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1171, 30], [0, 0, 0, 1, 9038, 2114, 28, 1134]])
    mask = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    assert max_diff(ours, reference, ids, mask) < 1e-3


# ---- Meta's consolidated.NN.pth ----

META_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
META_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}
# how convert_llama_weights_to_hf.py joins model-parallel shards, so we split the same way
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta(reference, folder, shards=1):
    """The HF model in Meta's layout: Meta names, q/k rows back in interleaved-pair order, params.json."""
    c = reference.config
    meta = {}
    for name, t in reference.state_dict().items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            meta_name = f"layers.{i}.{META_LAYER[module]}.{kind}"
        else:
            meta_name = META_TOP[name]
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        meta[meta_name] = permute_like_llama_cpp(t, heads) if heads else t
    meta["rope.freqs"] = torch.ones(c.hidden_size // c.num_attention_heads // 2)  # Llama 2 ships it
    folder.mkdir()
    for s in range(shards):
        part = {n: t if t.ndim == 1 else t.chunk(shards, META_SPLIT[n.split(".")[-2]])[s].clone()
                for n, t in meta.items()}
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "multiple_of": 32, "norm_eps": c.rms_norm_eps, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_loads_with_transformers_logits(shards, tmp_path):
    reference = hf_model("llama-mha-untied") if shards == 1 else hf_model("llama-gqa-tied")
    if reference.config.tie_word_embeddings:  # Meta always has its own output matrix: untie
        reference.config.tie_word_embeddings = False
        reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone() * 0.5)
    write_meta(reference, tmp_path / "meta", shards)
    ours = load_model(tmp_path / "meta")
    assert ours.config.vocab_size == 101 and ours.config.ffn_dim == 96
    ids, mask = batch()
    assert max_diff(ours, reference, ids, mask) < 1e-4


# ---- bad input: one-line UserError naming the file or field ----

@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    hf_model("llama-gqa-tied").save_pretrained(folder)
    return folder


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def bad_inputs(good, tmp):
    """name -> (path, regex the message must match)"""
    cases = {"no such path": (tmp / "nowhere", "no such checkpoint")}
    (tmp / "empty").mkdir()
    cases["folder without config.json"] = (tmp / "empty", "no config.json")

    truncated = copy_folder(good, tmp / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    cases["truncated safetensors"] = (truncated, "model.safetensors: not a readable safetensors")

    corrupt = copy_folder(good, tmp / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(64))
    cases["corrupt safetensors"] = (corrupt, "model.safetensors: not a readable safetensors")

    missing = copy_folder(good, tmp / "missing")
    from safetensors.torch import load_file, save_file
    state = load_file(missing / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    cases["missing tensor"] = (missing, "missing tensors model.layers.1.mlp.up_proj.weight")

    heads = copy_folder(good, tmp / "heads")
    config = json.loads((heads / "config.json").read_text())
    config |= {"num_attention_heads": 4, "num_key_value_heads": 3, "head_dim": 16}
    (heads / "config.json").write_text(json.dumps(config))
    cases["heads do not divide"] = (heads, r"config\.json.*n_kv_heads=3")

    writer = gguf.GGUFWriter(tmp / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    cases["gguf of another architecture"] = (tmp / "gpt2.gguf", "gpt2.gguf: GGUF architecture 'gpt2'")

    (tmp / "corrupt.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    cases["corrupt gguf"] = (tmp / "corrupt.gguf", "corrupt.gguf: not a readable GGUF")

    data = (tmp / "gpt2.gguf").read_bytes()
    (tmp / "truncated.gguf").write_bytes(data[:len(data) - 100])
    cases["truncated gguf"] = (tmp / "truncated.gguf", "truncated.gguf: not a readable GGUF")

    (tmp / "meta").mkdir()
    (tmp / "meta" / "params.json").write_text("{}")
    cases["meta folder without weights"] = (tmp / "meta", "no consolidated")
    return cases


BAD_CASES = ["no such path", "folder without config.json", "truncated safetensors", "corrupt safetensors",
             "missing tensor", "heads do not divide", "gguf of another architecture", "corrupt gguf",
             "truncated gguf", "meta folder without weights"]


@pytest.fixture(scope="module")
def bad(good_folder, tmp_path_factory):
    return bad_inputs(good_folder, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_one_line_user_error(case, bad):
    path, pattern = bad[case]
    with pytest.raises(UserError, match=pattern) as info:
        load_model(path)
    assert "\n" not in str(info.value) and str(path.name) in str(info.value)


@pytest.mark.parametrize("case", BAD_CASES)
def test_convert_cli_bad_input_exits_2_with_one_line(case, bad, tmp_path, capsys):
    path, pattern = bad[case]
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("minillama convert: error: ")
    assert path.name in err and re.search(pattern, err)
    assert not (tmp_path / "out").exists()


def test_public_api_saves_and_loads_model_and_tokenizer(tmp_path):
    import minillama
    from minillama.data.assets import llama_cpp_vocab_dir

    tok = minillama.load_tokenizer(llama_cpp_vocab_dir() / "ggml-vocab-llama-spm.gguf")
    model = minillama.Llama(minillama.preset("tiny").replace(vocab_size=tok.vocab_size)).init_weights(0)
    minillama.save_model(model, tmp_path / "m", tokenizer=tok)
    loaded, loaded_tok = minillama.load_model(tmp_path / "m"), minillama.load_tokenizer(tmp_path / "m")
    ids = tok.encode("Hello world")
    assert loaded_tok.encode("Hello world") == ids and ids[0] == tok.bos_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.tensor([ids])), model(torch.tensor([ids])), atol=0, rtol=0)


def test_convert_cli_gguf_to_folder(tmp_path, capsys):
    reference = hf_model("llama-gqa-tied")
    write_gguf(reference, tmp_path / "m.gguf", "llama")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float32"]) in (0, None)
    assert "out" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, mask = batch()
    assert max_diff(load_model(tmp_path / "out"), hf, ids, mask) < 1e-4
    assert max_diff(load_model(tmp_path / "out"), reference, ids, mask) < 1e-4
