"""Memory: what `minillama params` predicts for training, against what one real training step holds.

The notes (003, lines 3-102) count Llama-2-13B's parameters term by term, 13,015,864,320, and point to
training memory (line 104). Training memory is weights + gradients + AdamW's two moments (4 + 4 + 8 bytes a
parameter in fp32) + the activations autograd keeps for backward (model/calc.py, activation_bytes). Here:
1. the notes' 13B count, each term from the notes, from calc.count_params and from the module tree itself;
2. for presets that fit, calc's prediction against measurements on this CPU:
   - weights, gradients and optimizer state: the bytes of the tensors after a real step, counted;
   - activations: the bytes of every tensor autograd saves for backward during one forward pass
     (torch.autograd.graph.saved_tensors_hooks, storages counted once, parameters excluded), measured twice:
     as calc assumes (plain attention keeping its softmax, full fp32 logits for the loss) and as minillama's
     trainer runs (fused SDPA, chunked loss: neither the (T, S) probabilities nor the (B·T, V) logits kept);
   - the peak resident memory of the process during a real Trainer step above its resting memory (a fresh
     process; glibc told to return every block of 64 KiB or more, so freed tensors leave the resident set).
"""

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from minillama.config import preset
from minillama.lab.common import figure, one_thread, progress, save, table
from minillama.model import Llama
from minillama.model.calc import count_params, memory_estimate
from minillama.train.loss import CausalLMLoss

MiB = 2**20
# the notes' terms for Llama-2-13B (003, lines 51, 64-66, 83, 89, 94, 102)
NOTES_13B = {"embedding": 163_840_000, "attention per layer": 104_857_600, "mlp per layer": 212_336_640,
             "norms per layer": 2 * 5_120, "final norm": 5_120, "lm head": 163_840_000, "total": 13_015_864_320}
# preset, batch, sequence length: small enough for a CPU
QUICK_RUNS = [("stories260K", 4, 128)]
FULL_RUNS = [("tiny", 8, 128), ("stories260K", 8, 256), ("stories15M", 4, 256), ("stories42M", 2, 256)]


def llama2_13b_terms() -> list[dict]:
    """The notes' derivation, with each term also from calc.count_params and from a meta-device model."""
    config = preset("llama2-13b")
    C, F_, L, V = config.dim, config.ffn_dim, config.n_layers, config.vocab_size
    counts = count_params(config)
    with torch.device("meta"):
        model = Llama(config)
    layer = model.layers[0]
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    rows = [
        ("embedding", f"V·C = {V:,} x {C:,}", counts["embedding"], numel(model.model.embed_tokens)),
        ("attention per layer", f"4·C·C (q, k, v, o; {config.n_heads} heads x {config.head_dim})",
         counts["attention"] // L, numel(layer.self_attn)),
        ("mlp per layer", f"3·C·F, F = {F_:,}", counts["mlp"] // L, numel(layer.mlp)),
        ("norms per layer", "2·C", 2 * C, numel(layer.input_layernorm) + numel(layer.post_attention_layernorm)),
        ("final norm", "C", C, numel(model.model.norm)),
        ("lm head", "C·V (not tied)", counts["head"], numel(model.lm_head)),
        ("total", f"emb + {L}·(attn + mlp + norms) + norm + head", counts["total"], numel(model)),
    ]
    return [{"term": name, "formula": formula, "notes": f"{NOTES_13B[name]:,}", "calc": f"{c:,}", "model": f"{m:,}",
             "equal": NOTES_13B[name] == c == m} for name, formula, c, m in rows]


def saved_for_backward(model, batch, *, as_calc_assumes: bool) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward pass (each storage once, weights
    excluded). batch (B, T+1)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    for layer in model.layers:
        layer.self_attn.use_sdpa = not as_calc_assumes
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs, targets = batch[:, :-1], batch[:, 1:]
            if as_calc_assumes:  # the (B·T, V) log-probabilities in fp32, as a plain cross-entropy keeps them
                logits = model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            else:
                loss = CausalLMLoss(model)(inputs, targets)
        del loss
    finally:
        for layer in model.layers:
            layer.self_attn.use_sdpa = True
    return sum(kept.values())


def counted_state(name: str, B: int, T: int) -> dict:
    """One real Trainer step on random tokens; then the bytes of weights, gradients (before they are
    freed) and AdamW state, counted; and the activations saved for backward, both ways."""
    from minillama.config import TrainConfig
    from minillama.train.trainer import Trainer

    config = preset(name).replace(max_seq_len=T)
    model = Llama(config).init_weights(0)
    batch = torch.randint(0, config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    loss = CausalLMLoss(model)(batch[:, :-1], batch[:, 1:])
    loss.backward()
    gradients = nbytes(p.grad for p in model.parameters())
    model.zero_grad(set_to_none=True)
    trainer = Trainer(model, TrainConfig(max_steps=2, lr=1e-4, warmup_steps=1))
    trainer.train_step(batch)
    state = trainer.optimizer.state.values()
    optimizer = nbytes(t for s in state for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"weights": nbytes(model.parameters()), "gradients": gradients, "optimizer": optimizer,
            "activations_as_calc": saved_for_backward(model, batch, as_calc_assumes=True),
            "activations_trainer": saved_for_backward(model, batch, as_calc_assumes=False)}


# ---- resident memory of a real step, in a fresh process ----

def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def resident_step(name: str, B: int, T: int) -> None:
    """Run in a fresh process: print {"resting", "step_peak"} in bytes as JSON. resting = resident memory after
    one step (weights, AdamW state) minus before the model existed; step_peak = the highest resident memory
    during a second step minus the resting level (activations, gradients, temporaries)."""
    from minillama.config import TrainConfig
    from minillama.train.trainer import Trainer

    def trainer_of(config):
        return Trainer(Llama(config).init_weights(0), TrainConfig(max_steps=3, lr=1e-4, warmup_steps=1))

    torch.set_num_threads(1)  # as counted_state: a small model, a busy machine
    # a throwaway step of a tiny model first: the libraries' own first-use memory is not the model's
    trainer_of(preset("tiny")).train_step(torch.randint(0, 256, (1, 9)))
    gc.collect()
    before = _status("VmRSS")
    config = preset(name).replace(max_seq_len=T)
    trainer = trainer_of(config)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (B, T + 1), generator=generator) for _ in range(2)]
    trainer.train_step(batches[0])  # AdamW's moments are created here
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    resting = _status("VmRSS")
    trainer.train_step(batches[1])
    print(json.dumps({"resting": resting - before, "step_peak": _status("VmHWM") - resting}))


def measure_resident(name: str, B: int, T: int) -> dict | None:
    """resident_step in a subprocess; None where /proc cannot reset the peak (not Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    code = f"from minillama.lab.memory import resident_step; resident_step({name!r}, {B}, {T})"
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(name: str, B: int, T: int) -> dict:
    predicted = memory_estimate(preset(name).replace(max_seq_len=T), B, T, dtype="fp32")["training"]
    with one_thread():
        measured = counted_state(name, B, T)
    resident = measure_resident(name, B, T)
    pair = lambda p, m: f"{p / MiB:.2f} / {m / MiB:.2f}"  # noqa: E731  predicted / measured
    row = {"preset": name, "B x T": f"{B} x {T}"}
    for key in ("weights", "gradients", "optimizer"):
        row[f"{key} MiB"] = pair(predicted[key], measured[key])
    row["activations MiB"] = pair(predicted["activations"], measured["activations_as_calc"])
    row["trainer's activations MiB"] = f"{measured['activations_trainer'] / MiB:.2f}"
    if resident is not None:
        row["resting MiB"] = pair(predicted["weights"] + predicted["optimizer"], resident["resting"])
        row["step peak MiB"] = pair(predicted["activations"] + predicted["gradients"], resident["step_peak"])
    exact = all(predicted[key] == measured[key] for key in ("weights", "gradients", "optimizer"))
    return {"row": row, "predicted": predicted, "measured": measured, "resident": resident, "states_exact": exact}


def draw(runs: list[dict]):
    fig, (ax,) = figure(1, width=8.0)
    names = [r["row"]["preset"] for r in runs]
    x = torch.arange(len(names)).float()
    series = [("predicted (calc)", lambda r: r["predicted"]["activations"]),
              ("saved, calc's assumptions", lambda r: r["measured"]["activations_as_calc"]),
              ("saved, minillama trainer", lambda r: r["measured"]["activations_trainer"]),
              ("resident step peak (with gradients)", lambda r: (r["resident"] or {}).get("step_peak", 0))]
    for i, (label, value) in enumerate(series):
        ax.bar(x + (i - 1.5) * 0.2, [value(r) / MiB for r in runs], 0.2, label=label)
    ax.set_xticks(x, [f"{r['row']['preset']}\n{r['row']['B x T']}" for r in runs])
    ax.set(ylabel="MiB", title="activation memory of one training step: predicted vs measured")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return fig


def run(out: Path, quick: bool = False) -> dict:
    plan = QUICK_RUNS if quick else FULL_RUNS
    bar = progress(len(plan) + 1, "memory")
    terms = llama2_13b_terms()
    bar.update(1)
    runs = []
    for name, B, T in plan:
        runs.append(compare(name, B, T))
        bar.update(1)
    bar.close()
    tables = [table(terms), table([r["row"] for r in runs])]
    print(tables[0] + "\n\npredicted / measured\n" + tables[1])
    ratios = {r["row"]["preset"]: r["measured"]["activations_as_calc"] / r["predicted"]["activations"] for r in runs}
    exact = all(r["states_exact"] for r in runs)
    verdict = (f"13B count {'derived term by term: 13,015,864,320' if all(t['equal'] for t in terms) else 'MISMATCH'}; "
               f"weights, gradients and AdamW state {'exactly as predicted' if exact else 'DIFFER from the prediction'}"
               "; "
               "activations saved under calc's assumptions / predicted: "
               + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(verdict)
    results = {"llama2_13b": terms, "runs": runs, "activation_ratio": ratios, "verdict": verdict, "tables": tables}
    save(out, "memory", results, draw(runs))
    return results
