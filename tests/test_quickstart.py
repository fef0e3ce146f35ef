"""The quickstart end to end: a tiny budget on a few plays runs tokenizer, training, sampling and both
perplexities through the CLI; the full default run (slow) must beat the n-gram baseline."""

import json
import math

import pytest

from minillama.cli import main
from minillama.config import UserError
from minillama.quickstart import _fresh_run_folder

TINY = ["--time-budget", "30s", "--vocab-size", "512", "--dim", "64", "--n-layers", "2", "--n-heads", "4",
        "--hidden-dim", "128", "--seq-len", "64", "--batch-size", "8", "--warmup-steps", "5",
        "--ngram-orders", "2", "3", "--sample-tokens", "20"]


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    """Six plays as a corpus folder: five to train on, one held out."""
    from minillama.data.corpus import load_corpus

    folder = tmp_path_factory.mktemp("plays")
    for doc in load_corpus("shakespeare")[:6]:
        (folder / (doc.source.split(":")[1] + ".txt")).write_text(doc.text)
    return folder


def check_report(out: str, summary: dict, code: int) -> None:
    assert "---- sample" in out and "ROMEO." in out
    assert f"validation perplexity over the same {summary['val_tokens']:,} tokens" in out
    model_line = next(line for line in out.splitlines() if line.strip().startswith("model "))
    ngram_line = next(line for line in out.splitlines() if line.strip().startswith("n-gram "))
    assert float(model_line.split()[1]) == pytest.approx(summary["model_perplexity"], abs=0.01)
    assert float(ngram_line.split()[1]) == pytest.approx(summary["ngram_perplexity"], abs=0.01)
    assert "total wall time" in out
    # the verdict, the exit code and the numbers agree
    wins = summary["model_perplexity"] < summary["ngram_perplexity"]
    assert summary["model_wins"] == wins and code == (0 if wins else 1)
    assert ("the model wins" in out) == wins


def test_tiny_quickstart_end_to_end(plays, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["quickstart", "--out", str(run), "--corpus", str(plays), *TINY])
    out = capsys.readouterr().out
    summary = json.loads((run / "quickstart.json").read_text())
    check_report(out, summary, code)
    assert (run / "loss.png").stat().st_size > 0 and (run / "final" / "config.json").exists()
    assert summary["steps"] >= 1 and math.isfinite(summary["model_perplexity"])
    assert set(summary["ngram_perplexities"]) == {"2", "3"}
    assert summary["ngram_perplexity"] == min(summary["ngram_perplexities"].values())
    # both scored every validation token but the first
    from minillama.data.shards import TokenShards

    assert summary["val_tokens"] == TokenShards(run / "data" / "val").num_tokens - 1
    assert summary["sample"].startswith("ROMEO.\n") and len(summary["sample"]) > len("ROMEO.\n")


def test_run_folder_is_replaced_only_when_quickstart_wrote_it(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by quickstart"):
        _fresh_run_folder(mine)
    assert (mine / "notes.txt").exists()
    previous = _fresh_run_folder(tmp_path / "qs")
    (previous / "final").mkdir()
    again = _fresh_run_folder(tmp_path / "qs")
    assert not (again / "final").exists() and (again / "quickstart.json").exists()


def test_too_small_budget_is_a_user_error(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "run"), "--time-budget", "5s"]) == 2
    assert "leaves no time to train" in capsys.readouterr().err


def test_help_lists_the_shape_flags(capsys):
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    out = capsys.readouterr().out
    for flag in ("--time-budget", "--preset", "--dim", "--n-layers", "--vocab-size", "--out"):
        assert flag in out


@pytest.mark.slow
def test_default_quickstart_beats_the_ngram(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["quickstart", "--out", str(run)])
    out = capsys.readouterr().out
    summary = json.loads((run / "quickstart.json").read_text())
    check_report(out, summary, code)
    assert code == 0 and summary["model_wins"]
