import json

import pytest
import torch

from minillama.checkpoint.hf import config_to_hf
from minillama.cli import main
from minillama.config import PRESETS, preset
from minillama.model.calc import count_params, flops_per_token, memory_estimate

# published totals: Llama 2 paper / Hugging Face model cards
EXACT = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}


@pytest.mark.parametrize("name", EXACT)
def test_cli_prints_exact_total(name, capsys):
    assert main(["params", name]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["total", f"{EXACT[name]:,}"] in lines


@pytest.mark.parametrize("name", EXACT)
def test_cli_json_total(name, capsys):
    assert main(["params", name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["total"] == EXACT[name]
    assert report["params"] == count_params(preset(name))


def test_7b_breakdown():
    assert count_params(preset("llama2-7b")) == {
        "embedding": 32000 * 4096, "attention": 32 * 4 * 4096 * 4096, "mlp": 32 * 3 * 4096 * 11008,
        "norms": 65 * 4096, "head": 32000 * 4096, "total": 6_738_415_616}


@pytest.mark.parametrize("name", PRESETS)
def test_count_matches_model(name):
    from minillama.model import Llama

    config = PRESETS[name]
    with torch.device("meta"):
        model = Llama(config)
    assert count_params(config)["total"] == sum(p.numel() for p in model.parameters())  # tied weights once


def test_gqa_kv_cache_70b():
    config = preset("llama2-70b")  # 80 layers, 8 kv heads of 128 dims (64 query heads)
    mem = memory_estimate(config, batch_size=1, seq_len=4096, dtype="bf16")["inference"]
    per_token = 2 * 80 * 8 * 128 * 2  # keys and values, bf16: 327,680 bytes = 320 KiB
    assert mem["kv_cache_per_token"] == per_token == 320 * 1024
    assert mem["kv_cache_per_token_mha"] == 8 * per_token  # MHA: 64 kv heads
    assert mem["kv_cache_context"] == per_token * 4096  # 1.25 GiB
    assert mem["kv_cache_context_mha"] == 10 * 2**30


def test_training_memory_sums():
    config = preset("tiny")
    train = memory_estimate(config, batch_size=4, seq_len=64)["training"]
    n = count_params(config)["total"]
    assert (train["weights"], train["gradients"], train["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert train["total"] == 16 * n + train["activations"]
    double = memory_estimate(config, batch_size=8, seq_len=64)["training"]
    assert double["activations"] == 2 * train["activations"]  # linear in the batch


def test_flops_per_token_7b():
    config = preset("llama2-7b")
    n_matmul = 6_738_415_616 - 32000 * 4096 - 65 * 4096  # without the embedding lookup and the norms
    assert flops_per_token(config, 4096) == 6 * n_matmul + 12 * 32 * 4096 * 4096


def test_unknown_preset_is_one_line(capsys):
    assert main(["params", "llama2-8b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "llama2-8b" in err and all(name in err for name in PRESETS)


def test_config_file_and_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(preset("stories15M"))))  # HF config.json
    assert main(["params", str(tmp_path), "--json"]) == 0
    from_folder = json.loads(capsys.readouterr().out)["params"]["total"]
    assert main(["params", str(tmp_path / "config.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total"] == from_folder
    assert from_folder == count_params(preset("stories15M"))["total"]


# mixtures of experts: total and active parameters against the model cards (Mixtral: "46.7B total, 12.9B
# active"; Qwen1.5-MoE-A2.7B: "14.3B, 2.7B activated"; DeepSeek-V2-Lite: "15.7B, 2.4B activated", a count
# without the 0.21B input embedding)
MOE = {"mixtral-8x7b": (46_702_792_704, 12_879_925_248), "qwen2-moe-a2.7b": (14_315_784_192, 2_689_173_504),
       "deepseek-v2-lite": (15_706_484_224, 2_661_150_208)}


@pytest.mark.parametrize("name", MOE)
def test_moe_total_and_active_parameters(name, capsys):
    counts = count_params(preset(name))
    assert (counts["total"], counts["active"]) == MOE[name]
    assert main(["params", name]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["total", f"{MOE[name][0]:,}"] in lines and ["active", f"{MOE[name][1]:,}", "per", "token:", "k", "of",
                                                        "the", "experts"] in lines


def test_moe_flops_count_the_active_experts_only():
    config = preset("mixtral-8x7b")
    dense_equivalent = config.replace(n_experts=0)  # the same model with one expert's MLP
    sparse, dense = flops_per_token(config, 4096), flops_per_token(dense_equivalent, 4096)
    one_expert = 32 * 3 * 4096 * 14336  # a token visits two: one more expert's matmuls, plus the router
    assert sparse - dense == 6 * (one_expert + 32 * 4096 * 8)


def test_latent_attention_cache_is_latent_plus_rope_key():
    mem = memory_estimate(preset("deepseek-v2-lite"), batch_size=1, seq_len=4096, dtype="bf16")["inference"]
    assert mem["kv_cache_per_token"] == 27 * (512 + 64) * 2  # 27 layers, bf16: 30.4 KiB
    assert mem["kv_cache_per_token_mha"] == 2 * 27 * 16 * 128 * 2  # 16 heads of 128: 7.1x more
