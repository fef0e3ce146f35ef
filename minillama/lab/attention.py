"""`minillama lab attention`: what sharing or compressing keys and values buys, measured.

Four attentions at the same model width (dim, heads, head size):
  MHA   a key and a value per head                      cache per token and layer: 2·H·D numbers
  GQA   H/4 key/value heads, each shared by 4 queries   2·(H/4)·D
  MQA   one key/value head for all queries              2·D
  MLA   DeepSeek-V2's latent: R = 4·D, rope key D/2      R + D/2 = 4.5·D (the paper's ratios, its table 1)
The notes claim GQA and MQA cut the cache by n_heads / n_kv_heads, and MLA by more. Measured here: the
bytes the KV cache buffers of each model actually hold per token, the decode speed with a filled cache
(batch x context, where reading the cache is much of the work), and the validation loss each reaches in the
same training time on Shakespeare (as bytes).
"""

import time
from pathlib import Path

import torch

from minillama.config import ModelConfig
from minillama.lab.common import figure, one_thread, save, shakespeare_bytes, table, train_side_by_side
from minillama.model import Llama
from minillama.model.calc import count_params

SIZES = {False: dict(dim=256, n_layers=4, n_heads=8, seconds=180.0, batch=16, seq=64, decode_batch=8,
                     context=1024, steps=32),
         True: dict(dim=64, n_layers=2, n_heads=8, seconds=5.0, batch=8, seq=64, decode_batch=4, context=256,
                    steps=8)}


def variants(size: dict) -> dict[str, ModelConfig]:
    H, D = size["n_heads"], size["dim"] // size["n_heads"]
    base = ModelConfig(vocab_size=256, dim=size["dim"], n_layers=size["n_layers"], n_heads=H,
                       hidden_dim=size["dim"] * 8 // 3, max_seq_len=size["context"] + size["steps"],
                       bos_token_id=None, eos_token_id=None)
    return {"MHA": base, f"GQA ({H // 4} kv heads)": base.replace(n_kv_heads=H // 4),
            "MQA": base.replace(n_kv_heads=1),
            "MLA": base.replace(kv_lora_rank=4 * D, qk_rope_head_dim=D // 2, qk_nope_head_dim=D, v_head_dim=D,
                                model_type="deepseek_v2")}


@torch.no_grad()
def cache_bytes_per_token(model, batch: int, context: int) -> float:
    """The bytes the model's own cache allocates, per token (all layers)."""
    cache = model.new_cache(batch, context)
    return cache.nbytes / (batch * context)


@torch.no_grad()
def decode_speed(model, batch: int, context: int, steps: int) -> float:
    """Tokens/s of greedy decoding `steps` tokens for `batch` rows after a `context`-token prefill."""
    ids = torch.randint(0, 256, (batch, context), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch, context + steps)
    token = model(ids, cache=cache)[:, -1:].argmax(-1)  # (B, 1)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache)[:, -1:].argmax(-1)
    return batch * steps / (time.perf_counter() - start)


def run(out: Path, quick: bool = False) -> dict:
    size = SIZES[quick]
    torch.manual_seed(0)
    configs = variants(size)
    nets = {name: Llama(config).init_weights(0).eval() for name, config in configs.items()}
    rows = []
    for name, model in nets.items():
        per_token = cache_bytes_per_token(model, size["decode_batch"], size["context"])
        rows.append({"attention": name, "params": count_params(configs[name])["total"],
                     "kv_bytes_per_token": per_token})
    with one_thread():
        for round_ in range(3):  # alternating order, keep each one's best: the machine is shared
            for row, model in list(zip(rows, nets.values()))[::1 if round_ % 2 else -1]:
                speed = decode_speed(model, size["decode_batch"], size["context"], size["steps"])
                row["decode_tok_s"] = max(row.get("decode_tok_s", 0.0), speed)
    train_ids, val_ids = shakespeare_bytes()
    runs = train_side_by_side({name: model.train() for name, model in nets.items()}, train_ids, val_ids,
                              size["seconds"], batch_size=size["batch"], seq_len=size["seq"], lr=3e-3)
    mha = rows[0]
    for row, r in zip(rows, runs.values()):
        row |= {"cache_vs_mha": mha["kv_bytes_per_token"] / row["kv_bytes_per_token"],
                "decode_vs_mha": row["decode_tok_s"] / mha["decode_tok_s"], "steps": r["steps"],
                "val_loss": r["val_loss"]}
    print(f"dim {size['dim']}, {size['n_heads']} heads of {size['dim'] // size['n_heads']}, {size['n_layers']} "
          f"layers, fp32, 1 thread; decode: batch {size['decode_batch']} after {size['context']} tokens; "
          f"training: "
          f"{size['seconds']:.0f} s each on Shakespeare bytes")
    print(table(rows, ["attention", "params", "kv_bytes_per_token", "cache_vs_mha", "decode_tok_s", "decode_vs_mha",
                       "steps", "val_loss"]))
    results = {"sizes": size, "rows": rows, "losses": {name: r["losses"] for name, r in runs.items()}}
    save(out, "attention", results, plot(rows, runs))
    return results


def plot(rows: list[dict], runs: dict):
    fig, (cache, speed, losses) = figure(3, width=5.0)
    names = [r["attention"] for r in rows]
    cache.bar(names, [r["kv_bytes_per_token"] / 1024 for r in rows])
    cache.set(ylabel="KiB per token (all layers, fp32)", title="KV cache, measured")
    speed.bar(names, [r["decode_tok_s"] for r in rows])
    speed.set(ylabel="tokens/s", title="decoding with a filled cache")
    for name, r in runs.items():
        seconds, loss = zip(*r["losses"])
        window = max(1, len(loss) // 20)
        smooth = [sum(loss[max(0, i - window):i + 1]) / len(loss[max(0, i - window):i + 1]) for i in range(len(loss))]
        losses.plot(seconds, smooth, label=name)
    losses.set(xlabel="training seconds", ylabel="training loss (nats/byte)", title="quality, same training time")
    losses.legend()
    for axes in (cache, speed):
        axes.tick_params(axis="x", labelrotation=15)
    return fig
