"""One optimizer update: the Trainer takes a batch (token windows, or a fine-tuning batch) and does forward,
backward, clipping and an AdamW step, with gradient accumulation, bf16 autocast and the sync across
processes. The loop that feeds it batches, evaluates, logs and saves is loop.py.
"""

import contextlib
import math
import sys

import torch
import torch.distributed as dist

from minillama.config import UserError
from minillama.model import Llama
from minillama.perf.distributed import parallelize
from minillama.train.loss import CausalLMLoss

DEFAULT_WARMUP = 100  # steps, as llama2.c


def optimizer_groups(model: Llama, weight_decay: float) -> list[dict]:
    """Weight decay on the matmul weights only: decaying norms, biases or embeddings pulls them toward 0,
    a value with no special meaning for a gain, an offset or a token's vector."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied head is the embedding, listed once
        if not p.requires_grad:  # frozen (the base under LoRA): no gradient, no optimizer state
            continue
        if name.endswith(".bias") or "norm" in name or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of update number `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Trainer:
    """Optimizer steps on given batches: what train() loops over, and what a benchmark can drive.

    `config` is a TrainConfig (only its optimisation fields are read). `loss` is the model and its loss as
    one module (default CausalLMLoss(model); fine-tuning passes its own). Each process passes its own rows
    of the global batch to train_step; the returned loss is the mean over all the targets of all processes.
    """

    def __init__(self, model: Llama, config, *, world_size: int = 1, device: torch.device | None = None,
                 total_steps: int | None = None, loss: torch.nn.Module | None = None):
        self.model, self.config, self.world_size = model, config, world_size
        self.device = device or torch.device("cpu")
        self.total_steps = total_steps or config.max_steps or 1
        self.step = 0  # optimizer updates done
        self.autocast_dtype = None
        if config.dtype == "bfloat16":
            if bf16_supported(self.device):
                self.autocast_dtype = torch.bfloat16
            else:
                print("note: this CPU has no native bfloat16 matmul; training in float32", file=sys.stderr)
        loss = CausalLMLoss(model) if loss is None else loss
        self.module = parallelize(loss, world_size, fsdp=config.fsdp, compile=config.compile,
                                  activation_checkpointing=config.activation_checkpointing, device=self.device)
        # fused AdamW: one kernel for all parameters (CPU and CUDA); FSDP's sharded DTensors need foreach
        self.optimizer = torch.optim.AdamW(optimizer_groups(model, config.weight_decay), lr=config.lr,
                                           betas=(0.9, 0.95), eps=1e-8, fused=not config.fsdp)

    @property
    def warmup_steps(self) -> int:
        """The configured warmup; by default 100 steps, but at most a tenth of the run: a 30-step run with
        100 warmup steps would never reach the peak learning rate, let alone decay."""
        if self.config.warmup_steps is not None:
            return self.config.warmup_steps
        return min(DEFAULT_WARMUP, self.total_steps // 10)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _gradient_sync(self, sync: bool):
        """Accumulating micro-batches: reduce the gradients across processes only after the last one."""
        if self.config.fsdp:
            self.module.set_requires_gradient_sync(sync)
        elif self.world_size > 1 and not sync:
            return self.module.no_sync()  # DDP
        return contextlib.nullcontext()

    def _sum_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def _micro_batches(self, batch) -> list[dict]:
        """This process's rows as micro-batches of the loss module's keyword arguments: token windows (B, T+1)
        become inputs and targets shifted by one; a fine-tuning batch is a dict of (B, ...) tensors already."""
        if torch.is_tensor(batch):
            batch = {"inputs": batch[:, :-1], "targets": batch[:, 1:]}  # (B, T) each
        rows = len(batch["inputs"])
        micro = self.config.micro_batch_size or rows
        if rows % micro:
            raise UserError(f"batch of {rows} rows does not split into micro-batches of {micro}")
        return [{k: v[i:i + micro].to(self.device) for k, v in batch.items()} for i in range(0, rows, micro)]

    @staticmethod
    def _target_counts(micro_batches) -> list[torch.Tensor]:
        """How many targets (not -100: prompts and padding) each micro-batch holds."""
        return [(m["targets"] != -100).sum() for m in micro_batches]

    def train_step(self, batch) -> dict:
        """One optimizer update on this process's rows: token windows (B, T+1), or a dict of the loss module's
        arguments. Returns loss, lr and grad_norm. Raises FloatingPointError, without updating, when the loss
        or the gradient is NaN or infinite."""
        c = self.config
        lr = lr_at(self.step, c.lr, c.min_lr if c.min_lr is not None else c.lr / 10, self.warmup_steps,
                   self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self._micro_batches(batch)
        counts = self._target_counts(micro_batches)
        total = self._sum_over_processes(torch.stack(counts).sum())  # targets in the global batch
        loss_sum = torch.zeros((), device=self.device)
        for i, (rows, count) in enumerate(zip(micro_batches, counts)):
            with self._gradient_sync(i == len(micro_batches) - 1):
                with self._autocast():
                    loss = self.module(**rows)  # the mean over this micro-batch's targets
                # weighted by its share of the global batch's targets, so the gradient is the global mean's
                # (token windows: equal shares, 1 / micro-batches); x processes, as DDP averages over them
                share = total / (count * self.world_size)
                (loss / share).backward()
            loss_sum += loss.detach() * count
        loss = (self._sum_over_processes(loss_sum) / total).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), c.grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"loss {loss}, gradient norm {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self, batches: list) -> float:
        """Mean loss over all targets of the batches (as for train_step, this process's rows) and processes."""
        loss_sum, total = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        training = self.module.training
        self.module.eval()  # no dropout (LoRA's) while measuring
        for batch in batches:
            micro_batches = self._micro_batches(batch)
            for rows, count in zip(micro_batches, self._target_counts(micro_batches)):
                with self._autocast():
                    loss_sum += self.module(**rows).float() * count
                total += count
        self.module.train(training)
        if self.config.fsdp:  # the root keeps its gathered weights after a forward with no backward
            self.module.reshard()
        return (self._sum_over_processes(loss_sum) / self._sum_over_processes(total)).item()

    # ---- state for checkpoints: collective under FSDP, so every process calls these ----

    def optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # keyed by parameter name, gathered whole: loads into any world size or wrapping
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, self.optimizer, options=options)

    def load_optimizer_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def full_model(self) -> Llama | None:
        """The whole model on the CPU for saving: the model itself, or under FSDP its gathered shards
        (then only process 0 gets it, the others None)."""
        if not self.config.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)  # names start with "llama."
        if dist.get_rank() != 0:
            return None
        model = Llama(self.model.config)
        model.load_state_dict({k.removeprefix("llama."): v for k, v in state.items()},
                              strict=not self.model.config.tie_embeddings)
        return model
