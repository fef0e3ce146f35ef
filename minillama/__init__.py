"""minillama: the Llama 2 family from scratch, readable and fast enough for a CPU."""

from minillama.config import ModelConfig, UserError, preset

# The public API, imported on first use so `import minillama` stays light.
_LAZY = {
    "Llama": "minillama.model",
    "load_model": "minillama.checkpoint",
    "save_model": "minillama.checkpoint",
    "load_tokenizer": "minillama.tokenizer",
}

__all__ = ["ModelConfig", "UserError", "preset", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minillama' has no attribute {name!r}")
