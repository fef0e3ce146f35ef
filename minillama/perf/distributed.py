"""Processes and parallelism, applied from outside the model (torchtitan's `parallelize` step): the process
group torchrun starts, and the transforms activation checkpointing, torch.compile per layer,
DistributedDataParallel or FSDP2."""

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over processes, so all of them stop at the same step."""
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]


def init_processes() -> tuple[Processes, bool]:
    """From the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, NCCL on GPU.
    Returns the processes and whether we created the process group (and so must destroy it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Processes(device=torch.device("cuda" if cuda else "cpu")), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(dist.get_rank(), world_size, device), created



def parallelize(module: nn.Module, world_size: int = 1, *, fsdp: bool = False, compile: bool = False,
                activation_checkpointing: bool = False, device: torch.device | None = None) -> nn.Module:
    """CausalLMLoss (model + loss) -> the same, wrapped: activation checkpointing and torch.compile per
    decoder layer, then DDP or FSDP2.

    Parameter names do not change (checkpoints stay HF-named); the optimizer must be built afterwards,
    because FSDP replaces each parameter by its shard.
    """
    from torch.utils.checkpoint import checkpoint

    layers = module.llama.layers
    for layer in layers:
        if activation_checkpointing:
            # keep only each layer's input; recompute its insides in backward: ~1/3 more compute, far less memory
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        if compile:
            layer.compile()  # in place: the module keeps its name, unlike torch.compile(layer)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # per layer, then the root (embedding, final norm, head): each layer's full weights exist only
        # while it runs, gathered from the shards every process keeps
        for layer in layers:
            fully_shard(layer)
        return fully_shard(module)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device is not None and device.type == "cuda" else None
        # no buffer broadcast: the only buffers are the rotary tables, identical everywhere
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    return module
