"""Mixture of experts: a router sends each token to k of E expert MLPs, so a layer holds E MLPs' weights
but spends k MLPs' compute on a token (Shazeer et al. 2017, arXiv:1701.06538; Switch Transformer, Fedus
et al. 2021, arXiv:2101.03961; Mixtral, Jiang et al. 2024, arXiv:2401.04088).

Shapes: N tokens (B·T flattened), C model width, E experts, k experts per token.

Routing (MoE.route) as transformers' families do it: softmax over the experts in float32, the top k, then
rescaled to sum to 1 (Mixtral) or not (Qwen2-MoE, DeepSeek-V2), times DeepSeek's routed scale. Qwen2-MoE
and DeepSeek add a shared expert that every token goes through (Qwen2-MoE gates it with a sigmoid).

The experts run on grouped tokens (`grouped`): the (token, expert) pairs sorted by expert are contiguous
per expert, so each expert is one matmul chain over its rows; never a loop over tokens. `dense_reference`
runs every expert on every token, the plain definition the grouped dispatch is tested against.

Training adds the load-balancing loss and optionally the router z-loss (`router_loss`); the model hands
out each layer's router logits through `Llama.hidden_states(..., router_logits=[])`.

Module names are Qwen2-MoE's (mlp.gate, mlp.experts.N.gate_proj, mlp.shared_expert, mlp.shared_expert_gate);
Mixtral's and DeepSeek's checkpoint names are mapped in checkpoint/names.py.
"""

import torch
from torch import nn

from minillama.config import ModelConfig
from minillama.model.llama import MLP


class MoE(nn.Module):
    """The sparse MLP block: router, E SwiGLU experts, an optional shared expert. (B, T, C) -> (B, T, C)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.k, self.norm_topk_prob, self.routed_scale = config.experts_per_token, config.norm_topk_prob, \
            config.routed_scale
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)  # the router: a logit per expert
        self.experts = nn.ModuleList(MLP(config, config.moe_dim) for _ in range(config.n_experts))
        shared, gated = config.shared_expert_dim, config.shared_expert_gate
        self.shared_expert = MLP(config, shared) if shared else None
        self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False) if shared and gated else None
        self.use_grouped = True  # False selects dense_reference; a test shows they agree

    def forward(self, x, router_logits: list | None = None):
        """x (B, T, C) -> (B, T, C); this layer's router logits (N, E) are appended to router_logits."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        logits = self.gate(x)  # (N, E)
        if router_logits is not None:
            router_logits.append(logits)
        weights, chosen = self.route(logits)  # (N, k) each
        y = (grouped if self.use_grouped else dense_reference)(self.experts, x, weights, chosen)  # (N, C)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # (N, C)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared  # (N, 1) * (N, C)
            y = y + shared
        return y.view(B, T, C)

    def route(self, logits):
        """Router logits (N, E) -> the weights (N, k) of each token's k chosen experts, and their indices (N, k)."""
        probs = logits.float().softmax(dim=-1)  # (N, E), in float32 as every family does
        weights, chosen = probs.topk(self.k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.routed_scale, chosen


def grouped(experts, x, weights, chosen):
    """Each expert once, on the rows routed to it. x (N, C); weights, chosen (N, k) -> (N, C).

    The N·k (token, choice) pairs sorted by expert are contiguous per expert: gather the rows in that order,
    run expert e on its slice, put the outputs back in pair order and sum each token's k of them, weighted.
    (Summing by a gather, not index_add_: that scatters, and PyTorch's CPU scatter stalls for ~100 ms
    whenever another process holds a core.) While training every expert runs, an idle one on 0 rows, so
    each gets a gradient (zeros): DDP then sees every parameter used.
    """
    N, k = chosen.shape
    C = x.shape[1]
    flat = chosen.reshape(-1)  # (N·k,) pair p is token p // k's (p % k)-th choice
    order = flat.argsort(stable=True)  # (N·k,) pairs grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()  # rows per expert (one sync with the host)
    parts = x[order // k].split(counts)  # E slices of (n_e, C): each pair's token row
    outputs = [expert(part) for expert, part in zip(experts, parts) if len(part) or torch.is_grad_enabled()]
    out = torch.cat(outputs)[order.argsort()]  # (N·k, C) back in pair order
    return (out.view(N, k, C) * weights[..., None].to(x.dtype)).sum(dim=1)  # (N, C)


def dense_reference(experts, x, weights, chosen):
    """The definition, plainly: every expert on every token, each output times the token's weight for that
    expert (0 where the router did not choose it). E/k times the compute; the reference for tests."""
    gates = torch.zeros(x.shape[0], len(experts), dtype=weights.dtype, device=x.device)
    gates = gates.scatter(1, chosen, weights).to(x.dtype)  # (N, E)
    return sum(gates[:, e, None] * expert(x) for e, expert in enumerate(experts))  # (N, C)


# ---- the training losses of the router ----

def load_balancing_loss(router_logits: list, k: int, mask=None):
    """Switch Transformer's auxiliary loss (arXiv:2101.03961, eqs. 4-6) for top-k routing, as Mixtral and
    transformers' load_balancing_loss_func compute it:  E · Σₑ fₑ · Pₑ  over the tokens of all layers, with

      fₑ  the fraction of tokens whose top k include expert e (the fₑ sum to k),
      Pₑ  the mean probability the router gives expert e (the Pₑ sum to 1).

    fₑ has no gradient; Pₑ does, and is pushed down where fₑ is high. Perfectly uniform routing gives
    E · E · (k/E)(1/E) = k, its minimum. router_logits: (N, E) per layer; mask (B, T) with B·T = N: padding
    (0) counts in neither fₑ nor Pₑ.
    """
    logits = torch.cat(router_logits).float()  # (L·N, E)
    E = logits.shape[1]
    probs = logits.softmax(dim=-1)  # (L·N, E)
    chosen = probs.topk(k, dim=-1).indices  # (L·N, k)
    real = torch.ones(len(logits), device=logits.device) if mask is None else \
        mask.reshape(-1).float().repeat(len(router_logits))  # (L·N,) the same mask for every layer
    counts = torch.zeros(E, device=logits.device).index_add_(0, chosen.reshape(-1), real.repeat_interleave(k))
    f = counts / real.sum()  # (E,)
    P = (probs * real[:, None]).sum(0) / real.sum()  # (E,)
    return E * (f * P).sum()


def router_z_loss(router_logits: list):
    """ST-MoE's router z-loss (Zoph et al. 2022, arXiv:2202.08906, eq. 5): the mean of logsumexp(logits)²,
    which keeps the router's logits small (large ones round badly in bf16 and make routing brittle)."""
    return torch.cat(router_logits).float().logsumexp(dim=-1).square().mean()


def router_loss(router_logits: list, config: ModelConfig):
    """What training adds to the language-model loss: the weighted balance loss and z-loss."""
    loss = config.router_aux_loss_coef * load_balancing_loss(router_logits, config.experts_per_token)
    if config.router_z_loss_coef:
        loss = loss + config.router_z_loss_coef * router_z_loss(router_logits)
    return loss


def expert_usage(router_logits: list, k: int):
    """Share of the tokens each expert receives, per layer: (L, E), each row summing to 1."""
    usage = []
    for logits in router_logits:  # (N, E)
        chosen = logits.float().topk(k, dim=-1).indices  # top-k of the logits = top-k of the softmax
        usage.append(torch.bincount(chosen.reshape(-1), minlength=logits.shape[1]).float() / chosen.numel())
    return torch.stack(usage)
