"""The next-token loss: classifier + cross-entropy fused and chunked over rows, so the (B·T, V) logits
never exist at once. At small model sizes the 32k-way classifier and its log-softmax are the biggest cost
of a training step (most of the FLOPs at the stories15M shape), so this is where a trainer gains most."""

import torch
from torch import nn

from minillama.model import Llama
from minillama.model.moe import router_loss


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden @ weight.T, computed chunk_size rows at a time.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits are at hand
    (softmax minus one-hot is the gradient of the logits), and kept until backward scales them by the
    incoming gradient. So: 3 matmuls as in the plain version, no recomputation, and at most a (chunk, V)
    block of logits in memory instead of (B·T, V) logits, their log-softmax and its gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        # hidden (B·T, C), weight (V, C), targets (B·T,)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets != ignore_index  # (B·T,)
        scale = 1.0 / valid.sum().clamp(min=1)  # the mean's denominator, known before the first chunk
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None  # (V, C)
        with torch.autocast(device, enabled=False):  # we choose the dtypes ourselves, below
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)  # (n, C), n <= chunk_size rows
                t = targets[start:start + chunk_size]
                v = valid[start:start + chunk_size]
                t = torch.where(v, t, 0)  # ignored rows point at any class; their weight is 0 below
                logits = (h @ w.T).float()  # (n, V), in fp32 for the exp and sum
                target_logit = logits.gather(1, t[:, None]).squeeze(1)  # (n,)
                # logsumexp by hand, so the exp is computed once and reused as the softmax
                peak = logits.amax(dim=1, keepdim=True)  # (n, 1)
                probs = logits.sub_(peak).exp_()  # (n, V), unnormalised, in place of the logits
                sums = probs.sum(dim=1, keepdim=True)  # (n, 1)
                lse = sums.log().squeeze(1) + peak.squeeze(1)  # (n,)
                total += ((lse - target_logit) * v).sum()
                if not needs_grad:
                    continue
                # d loss / d logits = (softmax - onehot(target)) * valid / count
                row_scale = v[:, None] * scale  # (n, 1)
                grad_logits = probs.mul_(row_scale / sums)  # (n, V)
                grad_logits.scatter_add_(1, t[:, None], -row_scale)
                grad_logits = grad_logits.to(dtype)
                grad_hidden[start:start + chunk_size] = grad_logits @ w  # (n, C)
                if dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, h)  # (V, n) @ (n, C), accumulated in place
                else:
                    grad_weight += (grad_logits.T @ h).float()  # summed in float32 across chunks
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk_size: int = 256, ignore_index: int = -100):
    """F.cross_entropy(hidden @ weight.T, targets) without materialising the logits.

    hidden (B·T, C), weight (V, C) (the lm_head), targets (B·T,) -> scalar mean over non-ignored rows.
    """
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)


class CausalLMLoss(nn.Module):
    """The model and its next-token loss as one module, so DDP and FSDP wrap the whole forward pass.
    (The model's own forward always returns logits; the loss is the trainer's business.)

    A mixture-of-experts model adds its router losses (model/moe.py: load balance, z-loss) while a gradient
    is being taken; evaluation, without one, reports the language-model loss alone, comparable to a dense
    model's."""

    def __init__(self, llama: Llama, chunk_size: int = 256):
        super().__init__()
        self.llama = llama
        self.chunk_size = chunk_size

    def forward(self, inputs, targets):
        """inputs, targets (B, T) -> mean cross-entropy of predicting targets[b, t] after inputs[b, :t+1]."""
        routing = [] if self.llama.config.n_experts and torch.is_grad_enabled() else None  # router logits
        hidden = self.llama.hidden_states(inputs, router_logits=routing)  # (B, T, C)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (B·T, C)
        loss = chunked_cross_entropy(hidden, self.llama.head_weight, targets.reshape(-1), self.chunk_size)
        if routing:
            loss = loss + router_loss(routing, self.llama.config)
        return loss
