"""GGUF export: our loader reads back what we write (exact logits in f32, the same token ids, the same tensor
bytes when written again), every kind of vocabulary becomes llama.cpp's, `minillama verify` reports, and
bad input is one line. llama.cpp itself runs the files in test_llamacpp.py (`make test-llamacpp`)."""

import json

import gguf
import pytest
import torch

from minillama.checkpoint import load_model
from minillama.checkpoint.gguf_export import export_gguf
from minillama.cli import main
from minillama.config import ModelConfig, RopeScaling, UserError
from minillama.model import Llama
from minillama.tokenizer import Tokenizer, load_tokenizer
from minillama.tokenizer.gguf_vocab import PROBE, add_vocab
from minillama.tokenizer.vocab import PRE_TOKENIZERS

TEXTS = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
         "  Exeunt.  Ünïcödé 中文 2024\n\n\tend ▁ of scene", "KING HENRY V. Once more unto the breach, dear friends"]


@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    return load_model(trained_checkpoint), load_tokenizer(trained_checkpoint)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def shape(config: ModelConfig):
    return (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_dim,
            config.rope_theta, config.max_seq_len, config.tie_embeddings, config.qkv_bias)


def test_trained_model_round_trips_exactly_in_f32(trained, tmp_path):
    model, tok = trained
    assert tok.sentencepiece_model is not None  # our own SentencePiece vocabulary, from the run's .model
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    loaded, loaded_tok = load_model(path), load_tokenizer(path)
    assert shape(loaded.config) == shape(model.config) and loaded.config.norm_eps == pytest.approx(1e-5)
    for text in TEXTS:
        ids = tok.encode(text)
        assert loaded_tok.encode(text) == ids and loaded_tok.decode(ids[1:]) == text
        assert torch.equal(logits(loaded, ids), logits(model, ids))  # exact: the same float32 weights
    assert (loaded_tok.bos_id, loaded_tok.eos_id, loaded_tok.add_bos) == (tok.bos_id, tok.eos_id, True)
    meta = {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert meta["general.architecture"] == "llama"
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}  # tied: llama.cpp reuses token_embd


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_export_load_export_gives_the_same_tensor_bytes(kind, trained, tmp_path, capsys):
    model, tok = trained
    first = export_gguf(model, tok, tmp_path / "a.gguf", kind)
    note = capsys.readouterr().err
    second = export_gguf(load_model(first), load_tokenizer(first), tmp_path / "b.gguf", kind)
    a, b = gguf.GGUFReader(first).tensors, gguf.GGUFReader(second).tensors
    assert [t.name for t in a] == [t.name for t in b] and len(a) == 2 + 9 * 5  # tied: no output.weight
    for x, y in zip(a, b):
        assert x.tensor_type == y.tensor_type and bytes(x.data) == bytes(y.data), x.name
    types = {t.name: t.tensor_type.name for t in a}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == kind.upper()
    # the tied embedding makes the logits: 4-bit types keep it at 8 bits, as llama.cpp's quantize does
    assert types["token_embd.weight"] == ("Q8_0" if kind.startswith("q4") else kind.upper())
    # stories260K's SwiGLU width is 172: ffn_down's rows are not whole blocks of 32, so they stay f16
    if kind.startswith("q"):
        assert types["blk.4.ffn_down.weight"] == "F16" and types["blk.4.ffn_up.weight"] == kind.upper()
        assert "blk.0.ffn_down.weight (rows of 172)" in note and "kept in f16" in note
    else:
        assert types["blk.4.ffn_down.weight"] == kind.upper() and not note


def random_model(**changes):
    config = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                         max_seq_len=64).replace(**changes)
    model = Llama(config).init_weights(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):  # not the zeros and ones of init_weights
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1 + 1.0)
    return model


ARCHITECTURES = {  # (model, the metadata the file must carry)
    "qwen2, biases, tied": (dict(model_type="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6,
                                 norm_eps=1e-6), {"general.architecture": "qwen2", "qwen2.rope.freq_base": 1e6}),
    "llama, MQA, untied, linear rope": (dict(n_kv_heads=1, rope_scaling=RopeScaling("linear", 2.0)),
                                        {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}),
    "mistral, sliding window": (dict(model_type="mistral", sliding_window=16),
                                {"general.architecture": "llama", "llama.context_length": 16}),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_round_trip_exactly(name, tmp_path, capsys):
    changes, metadata = ARCHITECTURES[name]
    model = random_model(**changes)
    path = export_gguf(model, None, tmp_path / "m.gguf")
    meta = {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}
    assert {k: meta.get(k) for k in metadata} == metadata and meta["tokenizer.ggml.model"] == "no_vocab"
    if "sliding" in name:  # llama.cpp has no sliding window: the file claims only the window as context
        assert "no sliding window" in capsys.readouterr().err
    loaded = load_model(path)
    ids = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    with pytest.raises(UserError, match="carries no tokenizer"):
        load_tokenizer(path)


def test_ntk_rope_is_written_as_its_larger_base(tmp_path):
    model = random_model(rope_scaling=RopeScaling("ntk", 4.0))
    loaded = load_model(export_gguf(model, None, tmp_path / "m.gguf"))
    assert loaded.config.rope_scaling is None and loaded.config.rope_theta == pytest.approx(10000 * 4 ** (16 / 14))
    ids = list(range(40))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)  # base rounded to f32


def write_vocab(tok, path, n_vocab=None):
    writer = gguf.GGUFWriter(path, "llama")
    add_vocab(writer, tok, n_vocab or tok.vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


# SentencePiece from a GGUF (no .model: pieces, types and scores from the pipeline; Phi-3 adds user-defined
# chat tokens) and byte-level BPE; the other vocabularies run in test_llamacpp.py
@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gpt-2"])
def test_gguf_vocabularies_round_trip_to_llama_cpp_reference_ids(name, gguf_vocab, vocab_vectors, tmp_path):
    tok = gguf_vocab(name)
    meta = write_vocab(tok, tmp_path / "v.gguf", tok.vocab_size + 3)  # 3 embedding rows past the last token
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{tok.vocab_size + 2}]"
    reread = load_tokenizer(tmp_path / "v.gguf")
    for text, ids in vocab_vectors(name):
        assert reread.encode(text, bos=False) == ids, text
    assert (reread.bos_id, reread.eos_id, reread.add_bos) == (tok.bos_id, tok.eos_id, tok.add_bos)
    assert meta["tokenizer.ggml.model"] == ("gpt2" if name == "gpt-2" else "llama")


# tokenizer.json pre-tokenizers in Hugging Face's own words: the probe text finds llama.cpp's name for them
HF_SPLITS = {
    "gpt-2": None,  # ByteLevel's built-in GPT-2 regex
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+",
}


@pytest.mark.parametrize("pre", list(HF_SPLITS))
def test_byte_level_tokenizer_json_finds_its_pre_tokenizer_name(pre, tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=HF_SPLITS[pre] is None)
    backend.pre_tokenizer = byte_level if HF_SPLITS[pre] is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(HF_SPLITS[pre]), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator([PROBE] * 3 + TEXTS * 5, trainer)
    tok = Tokenizer(backend, eos_token="<|endoftext|>")
    tok.save(tmp_path / "hf")  # a tokenizer.json as Hugging Face writes it
    meta = write_vocab(load_tokenizer(tmp_path / "hf"), tmp_path / "v.gguf")
    assert PRE_TOKENIZERS[meta["tokenizer.ggml.pre"]] == PRE_TOKENIZERS[pre]
    reread = load_tokenizer(tmp_path / "v.gguf")
    for text in [PROBE] + TEXTS:
        assert reread.encode(text) == tok.encode(text), text
    assert reread.eos_id == 0 and meta["tokenizer.ggml.token_type"][0] == 3  # CONTROL


# ---- minillama verify ----

@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, tok = trained
    folder = tmp_path_factory.mktemp("exported")
    (folder / "text.txt").write_text("\n".join(TEXTS * 4))
    return folder, {kind: export_gguf(model, tok, folder / f"m-{kind}.gguf", kind) for kind in ("f32", "q8_0")}


def verify(a, b, *flags, capsys):
    assert main(["verify", str(a), str(b), *flags]) == 0
    return capsys.readouterr().out


def test_verify_reports_a_quantization(trained_checkpoint, exported, capsys):
    folder, files = exported
    r = json.loads(verify(trained_checkpoint, files["q8_0"], "--text", str(folder / "text.txt"), "--json",
                          "--steps", "16", "--prompt-tokens", "8", capsys=capsys))
    assert r["tokenizers_agree"] and r["tokens"] > 100 and len(r["layers_max_diff"]) == 5
    assert 0 < r["logits"]["max_diff"] < 1 and 0 < r["kl"]["mean"] < r["kl"]["max"] < 0.1
    assert all(d > 0 for d in r["layers_max_diff"]) and r["greedy"]["steps"] == 16
    assert r["greedy"]["agree"] >= 14 and r["perplexity"]["a"] > 1 and r["perplexity"]["b"] > 1
    assert r["perplexity"]["diff"] == pytest.approx(r["perplexity"]["b"] - r["perplexity"]["a"])


def test_verify_of_an_exact_conversion_is_all_zeros(trained_checkpoint, exported, capsys):
    folder, files = exported
    text = verify(trained_checkpoint, files["f32"], "--text", str(folder / "text.txt"), "--steps", "8",
                  capsys=capsys)
    assert "max |A-B| 0, mean 0; same top token at 100.0%" in text
    assert "B picks A's token at 8/8 steps; identical for the first 8" in text
    assert "B-A +0.0000" in text and "layer 4       max |A-B| 0" in text and "KL(A||B)" in text


# ---- bad input: one line, exit 2, nothing written ----

def convert_error(args, capsys):
    assert main(["convert", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("minillama convert: error: ")
    return err


def test_convert_refuses_an_existing_gguf_without_force(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert "--force" in convert_error([trained_checkpoint, out], capsys)
    assert out.read_bytes() == b"precious"
    assert main(["convert", str(trained_checkpoint), str(out), "--type", "q4_0", "--force"]) == 0
    assert "q4_0" in capsys.readouterr().out and load_model(out).config.n_layers == 5
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left behind


@pytest.mark.parametrize("flags,message", [(["--type", "q8_0"], "a folder takes --dtype"),
                                           (["--dtype", "bfloat16"], "give --type")])
def test_convert_flags_of_the_other_format(flags, message, trained_checkpoint, tmp_path, capsys):
    dst = tmp_path / ("out.gguf" if "--dtype" in flags else "out")
    assert message in convert_error([trained_checkpoint, dst, *flags], capsys)
    assert not dst.exists()


def test_export_refuses_a_model_llama_cpp_has_no_architecture_for(tmp_path):
    from minillama.model.llama import LlamaForSequenceClassification

    classifier = LlamaForSequenceClassification(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2), 3)
    with pytest.raises(UserError, match="score.weight has no place in llama.cpp's llama"):
        export_gguf(classifier, None, tmp_path / "c.gguf")
    assert not list(tmp_path.iterdir())


def test_export_refuses_vocabularies_llama_cpp_cannot_run(trained, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    model, tok = trained
    with pytest.raises(UserError, match="512 tokens but the model's embedding only 300 rows"):
        export_gguf(random_model(), tok, tmp_path / "small.gguf")
    word_level = Tokenizer(Backend(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(UserError, match="neither SentencePiece BPE nor byte-level BPE"):
        export_gguf(random_model(), word_level, tmp_path / "w.gguf")
    assert not list(tmp_path.iterdir())


def test_verify_bad_input(trained_checkpoint, exported, capsys):
    folder, _ = exported
    other = folder / "other.gguf"
    export_gguf(random_model(), None, other)
    for b, flags, message in [(other, [], "vocabulary of 512 and B of 300"),
                              (trained_checkpoint, ["--llama-cpp"], "reads .gguf files only"),
                              (trained_checkpoint, ["--steps", "0"], "--steps must be at least 1")]:
        code = main(["verify", str(trained_checkpoint), str(b), "--text", str(folder / "text.txt"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.slow  # writes SmolLM2 twice (540 + 145 MB) and reads it back: about a minute
def test_smollm2_reexported_round_trips_and_its_q8_0_agrees(smollm2_model, smollm2_tokenizer, tmp_path):
    from minillama.evaluate.verify import MinillamaRunner, compare

    f32 = export_gguf(smollm2_model, smollm2_tokenizer, tmp_path / "f32.gguf")
    assert gguf.GGUFReader(f32).fields["tokenizer.ggml.pre"].contents() == "smollm"
    a = MinillamaRunner(str(f32))
    for text in TEXTS:
        ids = smollm2_tokenizer.encode(text)
        assert a.tokenizer.encode(text) == ids
        assert torch.equal(logits(a.model, ids), logits(smollm2_model, ids))
    b = MinillamaRunner(str(export_gguf(a.model, a.tokenizer, tmp_path / "q8_0.gguf", "q8_0")))
    report = compare(a, b, open(__file__, encoding="utf-8").read().split('"""')[1], steps=64, prompt_tokens=16)
    assert report["greedy"]["steps"] == 64 and report["greedy"]["agree"] >= 61  # 95% of 64 steps
    assert 0 < report["kl"]["mean"] < 0.05 and len(report["layers_max_diff"]) == 30


def test_rope_scalings_llama_cpp_would_run_differently_are_refused(tmp_path):
    model = random_model(rope_scaling=RopeScaling("yarn", 4.0, original_max_seq_len=16))
    with pytest.raises(UserError, match="GGUF export writes RoPE plain, linear or ntk; this model has yarn"):
        export_gguf(model, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
