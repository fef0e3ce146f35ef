"""The model stage: the Llama decoder (llama.py), rotary positions (rope.py), the KV cache (cache.py),
mixtures of experts (moe.py) and DeepSeek's latent attention (mla.py), and parameter/memory arithmetic
(calc.py)."""

from minillama.model.cache import KVCache
from minillama.model.llama import Llama, LlamaForSequenceClassification

__all__ = ["KVCache", "Llama", "LlamaForSequenceClassification"]
