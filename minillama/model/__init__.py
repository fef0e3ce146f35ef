"""The model stage: the Llama decoder (llama.py), rotary positions and their length extensions (rope.py),
the position encodings placed at attention time: ALiBi, ReRoPE, dynamic NTK (positions.py), the KV caches
(cache.py: plain, and StreamingLLM's sinks + window), mixtures of experts (moe.py) and DeepSeek's latent
attention (mla.py), and parameter/memory arithmetic (calc.py)."""

from minillama.model.cache import KVCache, SinkCache
from minillama.model.llama import Llama, LlamaForSequenceClassification

__all__ = ["KVCache", "Llama", "LlamaForSequenceClassification", "SinkCache"]
