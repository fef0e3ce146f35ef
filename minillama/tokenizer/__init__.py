"""The tokenizer stage: the Tokenizer and its loader (tokenizer.py), vocabularies from SentencePiece and
GGUF files (vocab.py), and training our own SentencePiece BPE (train.py)."""

from minillama.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
