"""The benchmarks run end to end and report ratios that follow from their own measurements (they measure;
tests never assert wall time)."""

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
    assert float(rows["minillama"][3].rstrip("x")) == pytest.approx(speed["minillama"] / speed["transformers"],
                                                                    abs=0.01 + 1e-3 * speed["minillama"])
    assert float(rows["transformers"][6]) == pytest.approx(float(rows["minillama"][6]), abs=1e-3)  # first loss


def test_bench_generate_reports_ratios_and_weight_bytes():
    pytest.importorskip("transformers")
    from minillama.bench.generate import format_table, run_bench

    rows = run_bench(["stories15M"], ["transformers", "minillama", "int8"], rounds=1, new_tokens=3,
                     prefill_tokens=16, batch=2, progress=False)
    assert [r["contender"] for r in rows] == ["transformers", "minillama", "int8"]
    reference = rows[0]
    for r in rows:
        assert r["decode_b1"] > 0 and r["prefill"] > 0
        assert r["decode_b1_ratio"] == pytest.approx(r["decode_b1"] / reference["decode_b1"])
        assert r["prefill_ratio"] == pytest.approx(r["prefill"] / reference["prefill"])
    assert rows[2]["weight_mb"] < rows[1]["weight_mb"] / 3.5  # int8 + scales vs fp32
    assert 0 <= reference["others_cpu"] <= 1
    table = format_table(rows, 2)
    assert "decode b2" in table and "stories15M" in table
