"""Tokenizer: llama.cpp's reference ids, SentencePiece and Hugging Face parity, save round trip, bad input."""

import inspect
import json
import random
import textwrap

import pytest

from minillama.config import UserError
from minillama.infer.templates import render_chat
from minillama.tokenizer import load_tokenizer

# llama.cpp's vocabularies with test vectors that our two tokenizer kinds cover: SentencePiece ("llama")
# and byte-level BPE ("gpt2") with the pre-tokenizer regex of each tokenizer.ggml.pre.
VOCABS = ["llama-spm", "qwen2", "gpt-2", "llama-bpe", "phi-3", "starcoder", "refact", "mpt", "command-r"]

# English, Chinese, emoji, runs of spaces, newlines and tabs, digits, chat tokens written as text
STRINGS = [
    "Hello world", " Hello world", "What is the capital of France?", "你好，世界！今天天气很好。",
    "llamas 🦙🔥 and emoji 👩‍💻", "   three leading, two trailing  ", "a  b   c", "line1\nline2\n\n\ttab\r\n",
    "12345 + 3.14 = 12348.14", "Äpfel für 3,50 €", "<|im_start|>user\nhi<|im_end|>", "<s>[INST] hi [/INST]", "",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_reference_vectors(name, vocab_vectors, gguf_vocab):
    cases = vocab_vectors(name)
    assert len(cases) >= 40
    tok = gguf_vocab(name)
    for text, ids in cases:
        # llama.cpp tokenizes these with add_special=false: no BOS, whatever the vocabulary's default
        assert tok.encode(text, bos=False) == ids, text
        assert tok.decode(ids) == text


def test_special_ids_and_defaults(gguf_vocab):
    spm = gguf_vocab("llama-spm")
    assert (spm.bos_id, spm.eos_id, spm.add_bos, spm.vocab_size) == (1, 2, True, 32000)
    assert spm.encode("Hello world") == [1, 15043, 3186]  # Llama 2 prepends BOS by default
    assert spm.encode("Hello world", bos=False, eos=True) == [15043, 3186, 2]
    assert spm.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}

    qwen2 = gguf_vocab("qwen2")
    assert qwen2.add_bos is False and qwen2.eos_id == 151643
    assert {151643, 151645} <= qwen2.eos_ids  # <|endoftext|> and <|im_end|>
    assert qwen2.encode("<|im_start|>user", special=True) == [151644, 872]  # special-token text -> its id
    assert 151644 not in qwen2.encode("<|im_start|>user")  # by default, text is text
    assert qwen2.vocab_size == 151936

    gpt2 = gguf_vocab("gpt-2")
    assert (gpt2.eos_id, gpt2.add_bos, gpt2.chat_template, gpt2.pad_id) == (50256, False, None, None)


def assert_same_as_saved(tok, folder):
    """`folder` (written by tok.save) gives tok's ids through load_tokenizer and through transformers."""
    transformers = pytest.importorskip("transformers")
    mine, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in STRINGS:
        ids = tok.encode(text, special=True)  # transformers reads special-token text as the token
        assert mine.encode(text, special=True) == ids, text
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == mine.decode(ids) == tok.decode(ids), text
    assert (mine.bos_id, mine.eos_id, mine.pad_id, mine.eos_ids) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert mine.chat_template == tok.chat_template
    if tok.chat_template:
        rendered = theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        assert rendered == render_chat(tok, MESSAGES)


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_save_round_trip_from_gguf(name, gguf_vocab, tmp_path):
    tok = gguf_vocab(name)
    tok.save(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))  # temp files were renamed into place
    assert_same_as_saved(tok, tmp_path)


def test_tokenizer_json_alone_keeps_bos(gguf_vocab, tmp_path):
    tok = gguf_vocab("llama-spm")
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "special_tokens_map.json").unlink()
    alone = load_tokenizer(tmp_path / "tokenizer.json")  # BOS from the post-processor, no config
    assert (alone.bos_id, alone.add_bos) == (1, True)
    assert [alone.encode(t) for t in STRINGS] == [tok.encode(t) for t in STRINGS]


def test_save_round_trip_smollm2(smollm2, tmp_path):
    smollm2.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert_same_as_saved(smollm2, tmp_path)


# ---- SentencePiece .model files, checked against the sentencepiece library itself ----

SPM_SETTINGS = {
    # Llama 2's settings: BPE, no normalization, spaces kept, unknown characters as UTF-8 bytes
    "llama": dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                  remove_extra_whitespaces=False, split_digits=True),
    "llama+chat tokens": dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                              remove_extra_whitespaces=False, user_defined_symbols=["<|im_start|>", "<|im_end|>"]),
    # SentencePiece's defaults: NFKC normalization, runs of spaces collapsed, unknowns as <unk>
    "defaults": dict(model_type="bpe"),
    "unigram": dict(model_type="unigram", pad_id=3, bos_id=-1),
}


@pytest.fixture(scope="module")
def spm_corpus():
    import argparse
    import json.decoder

    text = "\n".join(inspect.getsource(m) for m in (json.decoder, argparse, textwrap))
    text += "\n" + "\n".join(["你好，世界！今天天气很好。我们去公园散步吧。", "Äpfel und Birnen kosten 3,50 €.",
                              "llamas 🦙 and emoji", "нещо на Български"] * 20)
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module", params=list(SPM_SETTINGS))
def spm_model(request, spm_corpus, tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(spm_corpus), model_prefix=str(prefix),
                                             vocab_size=600, minloglevel=2, **SPM_SETTINGS[request.param])
    return prefix.with_suffix(".model"), sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")


def test_sentencepiece_model_matches_sentencepiece(spm_model, spm_corpus):
    path, reference = spm_model
    tok = load_tokenizer(path)
    rng = random.Random(0)
    pieces = [rng.choice(spm_corpus)[rng.randrange(4):][:rng.randrange(1, 80)] for _ in range(200)]
    for text in STRINGS + ["ﬁ ligature Ⅻ ｆｕｌｌ", " ", "x<|im_end|>y"] + pieces:
        if "<s>" in text:  # we read control tokens written in text as their ids (as HF does); sentencepiece doesn't
            continue
        assert tok.encode(text, bos=False) == reference.encode(text), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
        None if i < 0 else i for i in (reference.bos_id(), reference.eos_id(), reference.pad_id()))


def test_sentencepiece_model_save_round_trip(spm_model, tmp_path):
    path, _ = spm_model
    tok = load_tokenizer(path)
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == path.read_bytes()
    assert_same_as_saved(tok, tmp_path)
    # a folder with only tokenizer.model + tokenizer_config.json (no tokenizer.json) loads the same
    (tmp_path / "tokenizer.json").unlink()
    assert [load_tokenizer(tmp_path).encode(t) for t in STRINGS] == [tok.encode(t) for t in STRINGS]


# ---- bad input: one-line UserError that names the file ----

def write_gguf(path, **strings):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in strings.items():
        writer.add_string(key.replace("_", "."), value)
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def write(path, data: bytes):
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing file": lambda d: d / "nope.gguf",
    "text as .gguf": lambda d: write(d / "a.gguf", b"hello"),
    "empty .gguf": lambda d: write(d / "b.gguf", b""),
    "unsupported ggml model": lambda d: write_gguf(d / "t5.gguf", tokenizer_ggml_model="t5"),
    "GGUF without tokenizer": lambda d: write_gguf(d / "none.gguf", general_name="x"),
    "text as .model": lambda d: write(d / "c.model", b"not a model\n" * 10),
    "JSON that is not a tokenizer": lambda d: write(d / "tokenizer.json", b'{"vocab_size": 3}'),
    "folder without tokenizer": lambda d: d,
    "unknown file type": lambda d: write(d / "weights.bin", bytes(8)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_user_error_naming_the_file(case, tmp_path):
    path = BAD_INPUTS[case](tmp_path)
    with pytest.raises(UserError) as error:
        load_tokenizer(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
