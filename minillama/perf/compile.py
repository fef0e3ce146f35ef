"""torch.compile of the decoder: fewer Python and dispatch steps per decoded token.

A decode step of a small model is hundreds of tiny ops (stories15M: ~150 per token), each costing a few
microseconds of Python and dispatch, which adds up to more than reading the 60 MB of weights takes.
TorchInductor fuses the element-wise ops (RMSNorm, rotary, SwiGLU's silu·up, residual adds) into a few
C++ loops and runs the step from one Python call. The matmuls stay library calls (or our kernel, if
apply_fast_linear ran first: it is a custom op, so it compiles as one opaque node).

Shapes are compiled dynamic (`dynamic=True`): the cache length grows every step and a new graph per
length would recompile forever. LlamaModel.positions_and_mask chooses its mask from shapes and from
whether a mask was passed, never from the mask's values, so the graph does not split there.
"""

from torch import nn


def apply_compile(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Compile the decoder stack in place (model.model, which the generator calls for prefill and
    decode), so the module tree, its state_dict and weight tying are unchanged. The first calls of each
    new shape family (prefill, decode, another batch size) pay the compilation, tens of seconds.

    mode: None (default), "reduce-overhead" or "max-autotune-no-cudagraphs" (torch.compile's modes).
    """
    model.model.compile(dynamic=True, mode=mode)
    return model
