import json
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minillama.cli import main
from minillama.data.corpus import load_corpus
from minillama.tokenizer import load_tokenizer
from minillama.tokenizer.train import train_tokenizer

# the edge cases of SentencePiece with identity normalization, a dummy prefix and byte fallback
EDGE = ["", " ", "  two leading spaces", "trailing  ", "\n", "x\ny\n\n", "\ttab", "a▁b", "▁", "▁ ▁",
        "2023-11-25 12:00", "中文和English混排", "emoji 😀👍🏽 and ZWJ 👩‍💻", "\x00nul", "\r\n", "e\u0301 vs \u00e9"]

PIECES = [" ", "  ", "\n", "\t", "▁", "a", "The", "中", "文", "😀", "0", "<0x0A>", "<"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1,000-piece tokenizer on 45 BBC articles and 60 People's Daily paragraphs (~0.1 s of training)."""
    out = tmp_path_factory.mktemp("tok")
    bbc, people = load_corpus("bbc-news"), load_corpus("people-daily")
    train = [d.text for d in bbc[::50] + people[:60]]
    val = [d.text for d in bbc[1:500:50] + people[60:80]]
    # coverage 0.99 instead of 0.9995 so that 939 distinct Chinese characters fit in 1,000 pieces:
    # the rarest become byte pieces, which the round-trip tests then exercise
    report = train_tokenizer(train, 1000, out, val_texts=val, character_coverage=0.99)
    return out, report, val


@pytest.fixture(scope="module")
def tok(trained):
    return load_tokenizer(trained[0])


def test_report(trained):
    out, report, val = trained
    assert {p.name for p in out.iterdir()} >= {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"}
    assert report["vocab_size"] == load_tokenizer(out).vocab_size == 1000
    assert report["lossless"] is True and report["val_texts"] == len(val)
    assert 1.3 < report["chars_per_token"] < 5.0  # 1.7 for this tiny vocabulary
    assert 0 < report["newline_rate"] <= report["byte_fallback_rate"] < 0.2


def test_llama2_layout(trained):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(trained[0] / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert sp.id_to_piece(258) == "<0xFF>" and sp.pad_id() == -1
    assert sp.encode("2023", out_type=str) == ["▁", "2", "0", "2", "3"]  # digits split, as in Llama 2


def test_same_ids_as_sentencepiece(trained, tok):
    import sentencepiece as spm

    out, _, val = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in val + EDGE:
        if "▁" not in text:  # SentencePiece itself reads ▁ as a space; see test_round_trip
            assert tok.encode(text, bos=False) == sp.encode(text), text


def test_hugging_face_same_ids(trained, tok):
    from transformers import AutoTokenizer

    out, _, val = trained
    hf = AutoTokenizer.from_pretrained(out)
    for text in val[:5] + val[-5:] + [t for t in EDGE if "▁" not in t]:  # see test_round_trip
        assert hf(text)["input_ids"] == tok.encode(text), text  # BOS included, as Llama 2 adds it
        assert hf.decode(tok.encode(text, bos=False)) == tok.decode(tok.encode(text, bos=False))


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.lists(st.sampled_from(PIECES)).map("".join)))
@example(text="  leading spaces")
@example(text=" ")
@example(text="\n")
@example(text="▁")  # SentencePiece's own space symbol, written in the text: sp.decode(sp.encode(t)) == " "
@example(text="a▁b")
def test_round_trip(tok, text):
    """identity normalization keeps every character and byte fallback covers any that has no piece,
    so only the dummy prefix (removed again by decode) and a written ▁ could lose information"""
    assert tok.decode(tok.encode(text, bos=False)) == text
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids[1:-1]) == text


@pytest.mark.parametrize("text", ["<s>", "a<s>b", "</s> end", "x <unk> y", "<0x0A>"])
def test_round_trip_special_token_text(tok, text):
    """The name of a special token inside plain text (a web page, source code) is text: encoding a corpus
    must not turn it into BOS/EOS, as Meta's Llama 2 reference (plain SentencePiece) does not."""
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text and not set(ids) & {tok.bos_id, tok.eos_id, 0}


def test_cli_train(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    words = "the quick brown fox jumps over a lazy dog while five wizards hex jolly 中文 字节".split()
    lines = [json.dumps({"text": " ".join(words[i * j % len(words)] for j in range(20)) + f" {i}"}) for i in range(200)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert re.search(r"chars per token +\d+\.\d\d", printed.out) and "lossless         yes" in printed.out
    assert "training a 400-piece BPE tokenizer" in printed.err
    assert (out / "tokenizer.json").exists()


@pytest.mark.parametrize("vocab, message", [
    ("100", "vocab size 100 is too small"),
    ("5000", r"sentencepiece could not train: Vocabulary size too high \(5000\)\. Please set it to a value <= \d+"),
])
def test_cli_bad_vocab_size(tmp_path, capsys, vocab, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 100)
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", vocab, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search("^minillama tokenizer: error: " + message, err.splitlines()[-1]) and "Traceback" not in err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--help"])
    assert e.value.code == 0 and "--vocab-size" in capsys.readouterr().out
