"""The benchmarks run end to end and report ratios that follow from their own measurements (they measure;
tests never assert wall time)."""

import importlib.util

import pytest

from minillama.cli import main


def test_bench_train_reports_ratios_of_its_measurements(capsys):
    pytest.importorskip("transformers")
    args = ["bench", "train", "--preset", "stories260K", "--batch-size", "2", "--seq-len", "32", "--steps", "1",
            "--rounds", "1", "--warmup", "0", "--dtypes", "float32", "--no-compile"]
    assert main(args) == 0  # it raises if the contenders' first losses differ (same weights, same task)
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("float32 ")}
    assert set(rows) == {"transformers", "minillama", "matmul"}
    speed = {name: float(rows[name][2].replace(",", "")) for name in ("transformers", "minillama")}
    ratio = speed["minillama"] / speed["transformers"]  # of the printed tok/s, rounded to whole tokens:
    rounding = 0.006 + ratio * (0.5 / speed["minillama"] + 0.5 / speed["transformers"])
    assert float(rows["minillama"][3].rstrip("x")) == pytest.approx(ratio, abs=rounding)
    assert float(rows["transformers"][6]) == pytest.approx(float(rows["minillama"][6]), abs=1e-3)  # first loss


def test_bench_generate_runs_the_cli_and_reports_ratios_of_its_measurements():
    from minillama.bench.generate import format_table, run_bench

    peers = ["llama.cpp"] if importlib.util.find_spec("llama_cpp") else []
    table = run_bench(["smollm2-q4_1"], ["minillama", *peers], rounds=1, new_tokens=4, batch_tokens=2,
                      progress=False)
    ours = table[0]
    assert ours["contender"] == "minillama" and ours["rounds"] == 1
    assert all(ours[k] > 0 for k in ("decode_b1", "decode_b8", "prefill", "first_token_s", "memory_mb"))
    assert 0 < ours["bandwidth_share"] < 2  # weight bytes x steps/s against a bandwidth measured in this run
    for peer in table[1:]:
        for key in ("decode_b1", "decode_b8", "prefill"):
            assert ours[f"{key}_vs_llama.cpp"] == pytest.approx(ours[key] / peer[key])
    assert "smollm2-q4_1" in format_table(table)
