"""Parallelism and memory transforms applied from outside the model (torchtitan's `parallelize` step):
activation checkpointing, torch.compile per layer, DistributedDataParallel or FSDP2."""

import functools

import torch
from torch import nn


def parallelize(module: nn.Module, world_size: int = 1, *, fsdp: bool = False, compile: bool = False,
                activation_checkpointing: bool = False, device: torch.device | None = None) -> nn.Module:
    """CausalLMLoss (model + loss) -> the same, wrapped: activation checkpointing and torch.compile per
    decoder layer, then DDP or FSDP2.

    Parameter names do not change (checkpoints stay HF-named); the optimizer must be built afterwards,
    because FSDP replaces each parameter by its shard.
    """
    from torch.utils.checkpoint import checkpoint

    layers = module.llama.model.layers
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
