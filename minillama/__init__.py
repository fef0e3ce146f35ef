"""minillama: the Llama 2 family from scratch, readable and fast enough for a CPU."""

from minillama.config import GenerationConfig, ModelConfig, TrainConfig, UserError, preset

# The public API, imported on first use so `import minillama` stays light.
_LAZY = {
    "Llama": "minillama.model",
    "KVCache": "minillama.model",
    "load_model": "minillama.checkpoint",
    "load_model_and_tokenizer": "minillama.checkpoint",
    "save_model": "minillama.checkpoint",
    "load_tokenizer": "minillama.tokenizer",
}

__all__ = ["GenerationConfig", "ModelConfig", "TrainConfig", "UserError", "preset", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minillama' has no attribute {name!r}")
