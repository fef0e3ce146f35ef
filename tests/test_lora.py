"""LoRA: our forward equals peft's on the same base and adapter weights, merged equals unmerged, only A and B
(and a classifier's new head) get gradients, and our adapter folder loads in peft onto transformers' model with
our logits; peft's own adapter folder loads into ours."""

import os

import pytest
import torch

from minillama.checkpoint import save_model
from minillama.checkpoint.peft import load_adapter, save_adapter
from minillama.config import ModelConfig
from minillama.model import Llama, LlamaForSequenceClassification
from minillama.model.calc import count_lora_params
from minillama.perf.lora import LoRALinear, apply_lora, lora_modules, merge_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32,
                     tie_embeddings=True, pad_token_id=0)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_model(r=4, alpha=8.0, seed=0, classifier=False, layers=None):
    """A seeded tiny model with LoRA whose B is not zero (a trained adapter, not a fresh one)."""
    model = Llama(CONFIG).init_weights(seed)
    if classifier:
        clf = LlamaForSequenceClassification(CONFIG, 3, ["neg", "neutral", "pos"], model=model.model)
        torch.nn.init.normal_(clf.score.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
        model = clf
    apply_lora(model, r, alpha, 0.0, TARGETS, layers, seed=seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def ids(batch=2, length=9, seed=3):
    return torch.randint(1, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "base"
    save_model(Llama(CONFIG).init_weights(0), folder)
    return folder


def test_fresh_lora_is_the_base_model_and_counts_match_calc():
    base = Llama(CONFIG).init_weights(0).eval()
    x = ids()
    expected = base(x)
    model = apply_lora(base, 4, 8.0, 0.0, TARGETS, seed=0)
    assert torch.equal(model(x), expected)  # B = 0: not one bit changes
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per layer r·(in + out): q 32 -> 32, v 32 -> 16, down 48 -> 32
    assert n_lora == count_lora_params(CONFIG, 4, TARGETS) == 2 * 4 * ((32 + 32) + (32 + 16) + (48 + 32))
    assert count_lora_params(CONFIG, 4, TARGETS, layers=1) == n_lora // 2


def test_merged_equals_unmerged():
    model = lora_model()
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)(x)
    assert not lora_modules(model) and isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_gradients_touch_only_a_and_b():
    model = lora_model(classifier=True).train()
    model.score.requires_grad_(True)  # what finetune does for a classifier's new head
    logits = model(ids(), torch.ones(2, 9, dtype=torch.long))
    logits.square().sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    lora = {name for name in with_grad if ".lora_A." in name or ".lora_B." in name}
    assert with_grad == lora | {"score.weight"} and len(lora) == 2 * 2 * len(TARGETS)
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name in with_grad)


def test_forward_equals_peft_on_the_same_weights(base_folder):
    ours = lora_model()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    reference = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    mine = {f"base_model.model.{name}".replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): p
            for name, p in ours.named_parameters() if p.requires_grad}
    theirs = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in mine.items():
            theirs[name].copy_(p)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x).logits, ours(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [None, [1]])
def test_our_adapter_loads_in_peft_and_peft_adapter_loads_in_ours(base_folder, tmp_path, layers):
    ours = lora_model(layers=layers)  # [1]: the top layer only, peft's layers_to_transform
    assert len(lora_modules(ours)) == len(TARGETS) * (2 if layers is None else 1)
    save_adapter(ours, tmp_path / "adapter", str(base_folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "peft_saved")  # peft's own writer
    again = apply_lora(Llama(CONFIG).init_weights(0), 4, 8.0, 0.0, TARGETS, layers, seed=1).eval()
    load_adapter(tmp_path / "peft_saved", again)
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=1e-6, rtol=0)


def test_classifier_adapter_loads_in_peft(base_folder, tmp_path):
    ours = lora_model(classifier=True)
    ours.score.requires_grad_(True)
    save_adapter(ours, tmp_path / "adapter", str(base_folder))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=3)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours(x), atol=1e-5, rtol=0)


def test_lora_layer_is_peft_arithmetic():
    """scaling = alpha / r, A Kaiming-uniform (bounded by 1/sqrt(in)), B zero."""
    layer = LoRALinear(torch.nn.Linear(64, 16), r=8, alpha=32.0, dropout=0.0)
    assert layer.scaling == 4.0 and torch.equal(layer.lora_B.weight, torch.zeros(16, 8))
    assert 0 < layer.lora_A.weight.abs().max() <= 1 / 64**0.5
    with pytest.raises(ValueError, match="not linear layers"):
        apply_lora(Llama(CONFIG), 4, 8.0, 0.0, ["qkv_proj"])
