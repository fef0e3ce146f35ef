"""peft's adapter folder: adapter_config.json + adapter_model.safetensors, what `peft.PeftModel.from_pretrained(
model, folder)` loads onto a transformers model (github.com/huggingface/peft, `save_pretrained`).

A tensor's name is peft's prefix `base_model.model.` + our module name (peft drops its adapter name "default"
when it saves), so `model.layers.0.self_attn.q_proj.lora_A.weight` needs nothing else. The adapter holds what
trained: the LoRA matrices, plus any other trainable module (a classifier's new `score` head), which peft calls
modules_to_save.
"""

import json
from pathlib import Path

import torch

from minillama.checkpoint.atomic import atomic_folder
from minillama.config import UserError

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_config(model, base: str) -> dict:
    """The adapter_config.json of a model with LoRA (perf/lora.py) on it."""
    from minillama.perf.lora import lora_modules

    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save as an adapter")
    first = next(iter(layers.values()))
    classifier = hasattr(model, "score")
    adapted = sorted({int(name.split("layers.")[1].split(".")[0]) for name in layers})  # model.layers.{i}.
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "layers_to_transform": None if len(adapted) == len(model.layers) else adapted,
        "modules_to_save": sorted({name.split(".")[0] for name in trainable_state(model) if ".lora_" not in name})
        or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What a LoRA run trained, by our names: the parameters that require a gradient."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def write_adapter_files(model, folder: Path, base: str) -> None:
    """adapter_config.json and adapter_model.safetensors in `folder` (a temporary one, renamed when complete)."""
    from safetensors.torch import save_file

    config = adapter_config(model, base)
    state = {PREFIX + name: t.detach().to("cpu").contiguous() for name, t in trainable_state(model).items()}
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def save_adapter(model, folder, base: str) -> Path:
    """The adapter folder, written atomically; `base` is recorded as base_model_name_or_path."""
    with atomic_folder(folder) as tmp:
        write_adapter_files(model, tmp, base)
    return Path(folder)


def read_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, {our name: tensor}) of a peft adapter folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).exists():
            raise UserError(f"{folder}: no {name}; not a peft adapter folder")
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(folder / WEIGHTS)
    except (ValueError, SafetensorError, OSError) as e:
        raise UserError(f"{folder}: unreadable adapter ({type(e).__name__}: {e})") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{folder / CONFIG}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    ours = {}
    for name, t in tensors.items():
        name = name.removeprefix(PREFIX).replace(".modules_to_save.default", "")
        ours[name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = t
    return config, ours


def load_adapter(folder, model) -> None:
    """Copy an adapter's tensors into a model that has the same LoRA layers (and trainable head)."""
    config, tensors = read_adapter(folder)
    expected = trainable_state(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{folder}: the adapter does not fit this model (r={config.get('r')}, targets "
                        f"{config.get('target_modules')}): missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in expected.items():
            if tensors[name].shape != p.shape:
                raise UserError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, the model's is "
                                f"{tuple(p.shape)}")
            p.copy_(tensors[name])
