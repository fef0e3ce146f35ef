"""`minillama lab experts`: what a mixture of experts buys, and what its balance loss is for.

Three models train side by side for the same time on Shakespeare (as bytes):
  dense       a SwiGLU MLP F wide in every layer;
  moe         8 experts F/2 wide, top 2: the same active parameters per token as dense, 4x its MLP weights;
  moe, no balance loss   the same, router_aux_loss_coef 0.
Measured: validation loss after the same training time; how the router spreads tokens over the experts
during training (the share of the busiest expert, the usage entropy; 1 = perfectly even), with and without
the Switch/Mixtral load-balancing loss. Does routing collapse without it?
"""

import math
from pathlib import Path

import torch

from minillama.config import ModelConfig
from minillama.lab.common import figure, save, shakespeare_bytes, table, train_side_by_side
from minillama.model import Llama
from minillama.model.calc import count_params
from minillama.model.moe import expert_usage

# full: 4 minutes per model; quick: 8 s per model (the test suite's version)
SIZES = {False: dict(dim=128, n_layers=4, n_heads=4, ffn=512, seconds=240.0, batch=16, seq=64, record=25),
         True: dict(dim=64, n_layers=2, n_heads=4, ffn=128, seconds=8.0, batch=8, seq=64, record=5)}


def models(size: dict) -> dict[str, ModelConfig]:
    base = ModelConfig(vocab_size=256, dim=size["dim"], n_layers=size["n_layers"], n_heads=size["n_heads"],
                       hidden_dim=size["ffn"], max_seq_len=size["seq"], bos_token_id=None, eos_token_id=None)
    moe = base.replace(n_experts=8, experts_per_token=2, expert_dim=size["ffn"] // 2, model_type="mixtral")
    return {"dense": base, "moe": moe, "moe, no balance loss": moe.replace(router_aux_loss_coef=0.0)}


def usage_summary(usage: torch.Tensor) -> dict:
    """usage (L, E) shares -> the busiest expert's share and the entropy of the shares / log E, layer means."""
    entropy = -(usage * usage.clamp(min=1e-12).log()).sum(-1) / math.log(usage.shape[1])  # (L,)
    return {"max_share": usage.max(-1).values.mean().item(), "evenness": entropy.mean().item()}


def run(out: Path, quick: bool = False) -> dict:
    size = SIZES[quick]
    torch.manual_seed(0)
    configs = models(size)
    nets = {name: Llama(config).init_weights(0) for name, config in configs.items()}
    train_ids, val_ids = shakespeare_bytes()
    probe = torch.stack([val_ids[i * size["seq"]:(i + 1) * size["seq"]] for i in range(16)])  # (16, T)
    usage = {name: [] for name in nets if configs[name].n_experts}

    def record(name, step, model):  # the router's choices on fixed validation text, every few steps
        if name in usage and step % size["record"] == 0:
            logits = []
            with torch.no_grad():
                model.hidden_states(probe, router_logits=logits)
            usage[name].append((step, expert_usage(logits, 2).tolist()))

    runs = train_side_by_side(nets, train_ids, val_ids, size["seconds"], batch_size=size["batch"],
                              seq_len=size["seq"], lr=3e-3, on_step=record)
    rows = []
    for name, r in runs.items():
        counts = count_params(configs[name])
        row = {"model": name, "params": counts["total"], "active": counts.get("active", counts["total"]),
               "steps": r["steps"], "tokens": r["steps"] * size["batch"] * size["seq"], "val_loss": r["val_loss"]}
        if name in usage and usage[name]:
            row |= usage_summary(torch.tensor(usage[name][-1][1]))
        rows.append(row)
    print(f"same training time ({size['seconds']:.0f} s each), Shakespeare bytes, "
          f"batch {size['batch']} x {size['seq']}; expert usage on held-out text (even = 1, one expert = 0)")
    print(table(rows, ["model", "params", "active", "steps", "tokens", "val_loss", "max_share", "evenness"]))
    results = {"seconds_each": size["seconds"], "sizes": size, "rows": rows, "usage": usage,
               "losses": {name: r["losses"] for name, r in runs.items()}}
    save(out, "experts", results, plot(runs, usage))
    return results


def plot(runs: dict, usage: dict):
    fig, (losses, shares, final) = figure(3, width=5.0)
    for name, r in runs.items():
        seconds, loss = zip(*r["losses"])
        window = max(1, len(loss) // 20)  # a running mean: single steps are noisy
        smooth = [sum(loss[max(0, i - window):i + 1]) / len(loss[max(0, i - window):i + 1]) for i in range(len(loss))]
        losses.plot(seconds, smooth, label=name)
    losses.set(xlabel="training seconds", ylabel="training loss (nats/byte)", title="same time, same active params")
    losses.legend()
    for name, records in usage.items():
        steps = [s for s, _ in records]
        shares.plot(steps, [usage_summary(torch.tensor(u))["max_share"] for _, u in records], label=name)
        last = torch.tensor(records[-1][1]).mean(0).tolist() if records else []  # (E,) mean over layers
        offset = -0.2 if "no balance" in name else 0.2
        final.bar([e + offset for e in range(len(last))], last, width=0.4, label=name)
    shares.axhline(2 / 8, color="gray", linestyle=":", label="even (k/E per token)")
    shares.set(xlabel="step", ylabel="busiest expert's share of tokens", title="routing over training")
    shares.legend()
    final.axhline(1 / 8, color="gray", linestyle=":")
    final.set(xlabel="expert", ylabel="share of routed tokens (layer mean)", title="expert usage at the end")
    final.legend()
    return fig
