"""Training-run checkpoints: RUN/step_NNNNNN/ and RUN/final/, each a Hugging Face folder (the weights,
config and tokenizer, loadable by anything) plus training_state.pt (step, optimizer, RNG states), so a
resumed run continues exactly where it stopped: its losses equal an uninterrupted run's.
"""

import dataclasses
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from minillama.checkpoint.atomic import atomic_folder
from minillama.checkpoint.hf import write_model_files
from minillama.config import UserError

STEP_FOLDER = re.compile(r"step_\d{6}")
STATE_FILE = "training_state.pt"


def save_checkpoint(trainer, folder: Path, tokenizer, config, procs, write_model=write_model_files) -> None:
    """Weights, config, tokenizer and training_state.pt, assembled in a temporary folder renamed into place;
    then only the newest `config.keep` step folders stay. All processes call this (FSDP gathers), process 0
    writes. `config` is the run's TrainConfig (saved in the state, for the record). write_model(model, tmp,
    tokenizer) writes the model's files (fine-tuning: an adapter, or merged weights)."""
    state = {"step": trainer.step, "data_position": trainer.step,  # windows are a function of the step
             "total_steps": trainer.total_steps, "optimizer": trainer.optimizer_state(), "rng": _rng_state(),
             "config": dataclasses.asdict(config), "world_size": procs.world_size}
    model = trainer.full_model()
    if procs.rank == 0:
        with atomic_folder(folder) as tmp:
            write_model(model, tmp, tokenizer)
            torch.save(state, tmp / STATE_FILE)
        for stale in sorted(p for p in folder.parent.iterdir() if STEP_FOLDER.fullmatch(p.name))[:-config.keep]:
            shutil.rmtree(stale)
    procs.barrier()


def latest_checkpoint(run: Path) -> tuple[Path, int] | None:
    """The checkpoint folder of RUN with the highest step (final or step_NNNNNN), and that step."""
    found = []
    for folder in run.iterdir() if run.is_dir() else []:
        if (STEP_FOLDER.fullmatch(folder.name) or folder.name == "final") and (folder / STATE_FILE).exists():
            state = torch.load(folder / STATE_FILE, mmap=True, weights_only=True)
            found.append((state["step"], folder.name == "final", folder))
    return (max(found)[2], max(found)[0]) if found else None


def load_weights(folder: Path, model) -> None:
    """The checkpoint's weights into `model` (before parallelize: FSDP shards them afterwards)."""
    from minillama.checkpoint.load import load_model

    saved = load_model(folder)
    if saved.config != model.config:
        raise UserError(f"{folder}: the checkpoint's model config differs from this run's; resume with the "
                        "same --preset/--config, --seq-len and tokenizer")
    model.load_state_dict(saved.state_dict())


def restore(trainer, folder: Path, max_steps: int | None) -> None:
    """Optimizer state, step counter, planned steps and RNG states of the checkpoint into `trainer`."""
    state = torch.load(folder / STATE_FILE, weights_only=True)
    trainer.load_optimizer_state(state["optimizer"])
    trainer.step = state["step"]
    trainer.total_steps = max_steps or state["total_steps"]
    _set_rng_state(state["rng"])


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
