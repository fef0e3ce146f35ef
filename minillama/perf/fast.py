"""The default fast path: matmul modules that keep weights as they are stored, and `make_fast`, the
transform every command applies after loading (unless --plain).

Decoding reads every weight once per token, so its speed is the bytes of the weights / memory bandwidth:
weights should be read in the smallest form they come in, and never copied to a wider one.
  FastLinear    fp32 or bf16 weights (bf16 = half the bytes; fp32 activations, as llama.cpp does)
  GGMLLinear    GGUF Q8_0 / Q4_0 / Q4_1 blocks straight from the file (1.06 / 0.56 / 0.63 bytes a weight)
  GGMLEmbedding the token embedding as GGUF blocks: a lookup dequantizes only the rows it reads
Up to KERNEL_ROWS rows of activations (decoding, a chat prompt) they call the C++ kernels (kernels.py) 8
rows at a time; more rows (prefill, evaluation) are a compute-bound GEMM, done by torch on weights
dequantized for that call (bf16 for Q4, whose weights are 4-bit anyway; fp32 for Q8_0, so that it stays
equal to its fp32 reference). A decode step runs each layer as two C++ calls (FastDecoderLayer), and with
a KVCache all layers as one (FastLlamaModel).
Activations, norms and the KV cache stay fp32. Each module's `weight` is its matrix dequantized to
(out, in), for code that inspects it; it costs a full conversion.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minillama.model.cache import KVCache
from minillama.model.llama import MLP, Attention, DecoderLayer, LlamaModel
from minillama.perf import kernels

NO_MASK = torch.empty(0, dtype=torch.bool)  # the kernels' "every key may be attended"
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # bytes per block of 32 weights
PREFILL_DTYPE = {"q8_0": torch.float32, "q4_0": torch.bfloat16, "q4_1": torch.bfloat16}
# Up to this many rows (a chat prompt, a server's batch of prompts) the kernels take the blocks 8 rows a
# call; beyond, one dequantization and torch's GEMM win. Measured, 1536 x 576 Q4_1, one thread: 32 rows
# 1.4 ms vs 11.5, 128 rows 5.8 vs 7.6 (the dequantization alone ~3.7 ms).
KERNEL_ROWS = 128


def dequantize(blocks, kind: str, dtype=torch.float32):
    """GGUF blocks (N, K/32 · bytes) uint8 -> weights (N, K) in `dtype`; the formulas of kernels.cpp."""
    N = blocks.shape[0]
    b = blocks.reshape(N, -1, BLOCK_BYTES[kind])  # (N, K/32, bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # (N, K/32, 1)
    if kind == "q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).float()  # (N, K/32, 32)
        w = q * d
    else:
        nibbles = b[..., 2:] if kind == "q4_0" else b[..., 4:]  # (N, K/32, 16)
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float()  # (N, K/32, 32): low nibbles first
        w = (q - 8) * d if kind == "q4_0" else q * d + b[..., 2:4].contiguous().view(torch.float16).float()
    return w.reshape(N, -1).to(dtype)  # (N, K)


def quantize(weight, kind: str):
    """Weights (N, K) -> GGUF blocks of `kind`, with the gguf package's reference quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    blocks = gguf_quantize(weight.detach().float().numpy(), GGMLQuantizationType[kind.upper()])
    return torch.from_numpy(blocks)  # (N, K/32 · bytes) uint8


class GGMLLinear(nn.Module):
    """y = x · Wᵀ (+ bias) with W (N, K) kept as GGUF blocks (N, K/32 · bytes) of `kind`."""

    def __init__(self, blocks, kind: str, in_features: int, bias=None):
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self.bias = bias

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.shape[0] <= KERNEL_ROWS and kernels.available():
            rows = x2.float()
            y = torch.cat([kernels.linear_rows(rows[i:i + kernels.MAX_ROWS], self.blocks, self.kind, self.out_features)
                           for i in range(0, len(rows), kernels.MAX_ROWS)])  # (M, N), 8 rows a call
        else:
            dtype = PREFILL_DTYPE[self.kind]
            y = F.linear(x2.to(dtype), dequantize(self.blocks, self.kind, dtype))
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self):
        return dequantize(self.blocks, self.kind)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} blocks"


class GGMLEmbedding(nn.Module):
    """The token embedding as GGUF blocks (V, C/32 · bytes); a tied LM head shares the same tensor."""

    def __init__(self, blocks, kind: str, dim: int):
        super().__init__()
        self.kind, self.dim = kind, dim
        self.register_buffer("blocks", blocks)

    def forward(self, ids):
        rows = self.blocks[ids.reshape(-1)]  # (B·T, C/32 · bytes): only the rows looked up
        return dequantize(rows, self.kind).view(*ids.shape, self.dim)  # (B, T, C)

    @property
    def weight(self):
        return dequantize(self.blocks, self.kind)


class FastLinear(nn.Linear):
    """nn.Linear over fp32 or bf16 weights whose few-row calls go to the bandwidth-bound kernel; more rows
    to torch's GEMM in the weights' dtype; the output has the activations' dtype."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FastLinear":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.in_features, fast.out_features = linear.in_features, linear.out_features
        fast.weight, fast.bias = linear.weight, linear.bias  # the same Parameters: tying survives
        return fast

    def forward(self, x):
        w = self.weight
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kind = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(w.dtype)
        usable = kind and x2.shape[0] <= kernels.MAX_ROWS and self.in_features % 32 == 0 and w.is_contiguous()
        if usable and x.device.type == "cpu" and kernels.available():
            y = kernels.linear_rows(x2.float(), w.detach(), kind, self.out_features).to(x.dtype)
        elif w.dtype == torch.float32 and x.device.type == "cpu" and torch.backends.mkldnn.is_available() \
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):  # (no backward)
            # oneDNN's fp32 GEMM, ~2x the GFLOP/s of F.linear's MKL, which takes its AVX2 path on AMD CPUs
            # (measured 520 vs 236 GFLOP/s on 2 Zen 5 cores; F.linear is what transformers' prefill runs)
            y = torch.ops.mkldnn._linear_pointwise(x2.float(), w.detach(), None, "none", [], "").to(x.dtype)
        else:
            y = F.linear(x2.to(w.dtype), w).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def raw(linear) -> tuple | None:
    """(weights as the kernels read them, their kind) of a FastLinear or GGMLLinear, else None."""
    if isinstance(linear, GGMLLinear):
        return linear.blocks, linear.kind
    if isinstance(linear, FastLinear) and linear.weight.dtype in (torch.float32, torch.bfloat16):
        return linear.weight.detach(), "f32" if linear.weight.dtype == torch.float32 else "bf16"
    return None


def _storage(linear) -> int | None:
    """Where a projection's weights live (a cast or a new tensor moves them), read from the module's own
    dicts: nn.Module's __getattr__ is slow enough to matter 210 times a token."""
    tensor = linear._buffers.get("blocks", linear._parameters.get("weight"))
    return tensor.data_ptr() if tensor is not None else None


class FastDecoderLayer(DecoderLayer):
    """A DecoderLayer whose decode steps (one new token per row, up to kernels.MAX_ROWS rows, fp32) run as
    two C++ calls around the cache write, instead of ~70 PyTorch ops whose dispatch costs more than
    reading the layer's weights: attn_in (norm, q/k/v, rotary), then layer_out (attention over the cache,
    o_proj, residual; norm, SwiGLU, residual). Any other call is DecoderLayer.forward, the reference: among
    them every position encoding placed at attention time (rope a Positions: ALiBi, ReRoPE, dynamic NTK,
    a SinkCache), since attn_in rotates keys once, before the cache keeps them. Only layers of
    llama.Attention and a dense MLP become one (make_fast): latent attention and experts keep the
    reference forward."""

    def _plan(self):
        """The step's fixed arguments (weights as the kernels read them, formats, sizes), looked up once:
        Python attribute lookups cost ~80 us a layer, as much as its attention. Rebuilt when a projection
        or its storage changes (LoRA applied, weights cast); None when the kernels cannot read one."""
        # the modules' own dicts: nn.Module's __getattr__ would cost more than the lookup saves
        attn, mlp = self._modules["self_attn"]._modules, self._modules["mlp"]._modules
        linears = [attn[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                  [mlp[name] for name in ("gate_proj", "up_proj", "down_proj")]
        key = tuple((m, _storage(m)) for m in linears)
        plan = self.__dict__.get("_decode_plan")
        if plan is not None and plan[0] == key:
            return plan[1]
        attn, mlp = self.self_attn, self.mlp
        parts = [raw(m) for m in linears]
        key = key if None not in parts else None
        C = attn.q_proj.in_features
        usable = key is not None and kernels.available() and attn.o_proj.bias is None \
            and not any(n % 32 for n in (C, attn.o_proj.in_features, mlp.down_proj.in_features))
        args = None
        if usable:
            H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
            kinds = [kernels.KINDS[k] for _, k in parts]
            weights = [w for w, _ in parts]
            bias = [m.bias.detach() if m.bias is not None else torch.empty(0) for m in linears[:3]]
            norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
            sizes = [H * D, K * D, K * D]  # q, k, v
            args = dict(sizes=sizes, heads=(H, K, D),
                        attn_in=(norm1.weight.detach(), norm1.eps, weights[:3], kinds[:3], sizes, bias),
                        out=(weights[3], kinds[3], H, norm2.weight.detach(), norm2.eps, weights[4:], kinds[4:],
                             [mlp.gate_proj.out_features, mlp.up_proj.out_features, C]))
        self.__dict__["_decode_plan"] = (key, args)  # a plain attribute: not a submodule, not in state_dict
        return args

    def forward(self, x, rope, mask, cache=None, layer=0, router_logits=None):
        B, T, C = x.shape
        # keys rotated once, before any cache (a KVCache, or serve's PagedKVCache through its write) keeps them
        fixed = isinstance(rope, tuple) and cache is not None and (mask is None or mask.dtype == torch.bool)
        plan = self._plan() if fixed and T == 1 and B <= kernels.MAX_ROWS and x.dtype == torch.float32 else None
        if plan is None:  # prefill, or weights the kernels do not read
            return super().forward(x, rope, mask, cache, layer, router_logits)
        cos, sin = rope  # (B, 1, 1, D) each
        H, K, D = plan["heads"]
        ext = kernels.module()
        x2 = x.reshape(B, C)  # (B, C): one token per row
        qkv = ext.attn_in(x2, *plan["attn_in"], cos.reshape(B, D), sin.reshape(B, D))  # (B, (H + 2K)·D)
        q, k, v = qkv.split(plan["sizes"], dim=1)
        k, v = k.reshape(B, K, 1, D), v.reshape(B, K, 1, D)
        if hasattr(cache, "write_rows"):  # paged (serve): each row's keys where its blocks hold them, unpadded
            k, v = cache.write_rows(layer, k, v)  # B x (K, L_b + 1, D)
        else:
            k, v = cache.write(layer, k, v)  # (B, K, S, D)
            k, v = k.unbind(0), v.unbind(0)  # B x (K, S, D)
        keys = mask.reshape(B, -1).contiguous() if mask is not None else NO_MASK  # (B, S): row b's are its last L_b + 1
        return ext.layer_out(x2, q.contiguous(), k, v, keys, *plan["out"]).view(B, 1, C)


class FastLlamaModel(LlamaModel):
    """A LlamaModel whose decode steps over a KVCache, when every layer is a FastDecoderLayer the kernels
    can run, go through all layers in one C++ call (kernels.cpp decode_layers: per layer what
    FastDecoderLayer.forward does, the cache write included); any other call is LlamaModel's."""

    def _layers(self, input_ids, mask, rope, cache, router_logits):
        B, T = input_ids.shape
        step = type(cache) is KVCache and T == 1 and B <= kernels.MAX_ROWS and isinstance(rope, tuple) \
            and (mask is None or mask.dtype == torch.bool) and self.norm.weight.dtype == torch.float32
        plans = [layer._plan() if type(layer) is FastDecoderLayer else None for layer in self.layers] if step else [None]
        if None in plans:
            return super()._layers(input_ids, mask, rope, cache, router_logits)
        x = self.embed_tokens(input_ids).reshape(B, -1).float()  # (B, C): one token per row
        keys, values, slot = cache.buffers(1)
        H, K, D = plans[0]["heads"]
        cos, sin = rope  # (B, 1, 1, D) each
        x = kernels.module().decode_layers(x, cos.reshape(B, D), sin.reshape(B, D),
                                           mask.reshape(B, -1).contiguous() if mask is not None else NO_MASK,
                                           keys, values, slot, *self._flat(plans), H, plans[0]["out"][7][0])
        return self.norm(x.view(B, 1, -1))

    def _flat(self, plans):
        """The layers' plans as decode_layers takes them, (tensors, kinds, eps), rebuilt when a plan is."""
        cached = self.__dict__.get("_flat_plans")
        if cached is not None and len(cached[0]) == len(plans) and all(a is b for a, b in zip(cached[0], plans)):
            return cached[1]
        tensors, kinds, eps = [], [], []
        for plan in plans:  # per layer: norm1, wq, wk, wv, bq, bk, bv, wo, norm2, wgate, wup, wdown
            norm1, eps1, w_in, kinds_in, _, bias = plan["attn_in"]
            wo, kind_o, _, norm2, eps2, w_mlp, kinds_mlp, _ = plan["out"]
            tensors += [norm1, *w_in, *bias, wo, norm2, *w_mlp]
            kinds += [*kinds_in, kind_o, *kinds_mlp]
            eps += [eps1, eps2]
        self.__dict__["_flat_plans"] = (plans, (tensors, kinds, eps))
        return tensors, kinds, eps


def make_fast(model: nn.Module) -> nn.Module:
    """Every plain nn.Linear becomes a FastLinear over the same weights (fp32 or bf16), GGUF blocks are
    already fast, and every decoder layer a FastDecoderLayer (the same module, its decode step fused).
    Builds the kernels now, not in the middle of the first answer."""
    if not kernels.available():
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                setattr(module, name, FastLinear.from_linear(child))
        if type(module) is DecoderLayer and type(module.self_attn) is Attention and type(module.mlp) is MLP:
            module.__class__ = FastDecoderLayer  # same parameters and names; only forward changes
        if type(module) is LlamaModel:
            module.__class__ = FastLlamaModel
    return model


def to_bf16_weights(model: nn.Module) -> nn.Module:
    """Matmul weights (and a tied embedding) in bf16, half the bytes to read; norms, activations and the
    KV cache stay fp32, and FastLinear widens the weights in registers."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data = module.weight.data.to(torch.bfloat16)  # .data: a tied head follows
    return model


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Every nn.Linear as GGUF blocks of `kind` (q8_0, q4_0, q4_1), quantized here: `--quantize`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % 32 == 0:
                setattr(module, name, GGMLLinear(quantize(child.weight, kind), kind, child.in_features, child.bias))
    return model
