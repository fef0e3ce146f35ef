"""Vocabularies as `tokenizers` pipelines: SentencePiece models (Llama 2, TinyLlama, our own trained ones)
from a .model file or a GGUF "llama" vocabulary, and byte-level BPE (GPT-2, Qwen2, SmolLM2, Llama 3) from a
GGUF "gpt2" vocabulary. Each reproduces the original tokenizer's ids (tested against llama.cpp's vectors)."""

import re
from pathlib import Path

from minillama.config import UserError
from minillama.tokenizer.tokenizer import Tokenizer

# SentencePiece piece types (sentencepiece_model.proto); GGUF's tokenizer.ggml.token_type uses the same.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ---- SentencePiece: a .model file, or a GGUF "llama" vocabulary ----

def load_sentencepiece(path: Path, config: dict) -> Tokenizer:
    """A SentencePiece .model file, read with sentencepiece's own ModelProto (sentencepiece_model.proto)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    data = path.read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    spec, normalizer = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if not pieces or not 0 <= spec.unk_id < len(pieces):
        raise UserError(f"{path}: not a SentencePiece model (no pieces, or no unknown piece)")
    if spec.model_type not in (spec.UNIGRAM, spec.BPE) or spec.treat_whitespace_as_suffix:
        raise UserError(f"{path}: only SentencePiece BPE and unigram models with prefix whitespace are supported")

    def piece(i):
        return pieces[i][0] if 0 <= i < len(pieces) else None

    backend = sentencepiece_backend(pieces, unigram=spec.model_type == spec.UNIGRAM, byte_fallback=spec.byte_fallback,
                                    add_dummy_prefix=normalizer.add_dummy_prefix, unk_id=spec.unk_id,
                                    remove_extra_whitespaces=normalizer.remove_extra_whitespaces,
                                    charsmap=normalizer.precompiled_charsmap)
    return Tokenizer(backend, bos_token=config.get("bos_token", piece(spec.bos_id)),
                     eos_token=config.get("eos_token", piece(spec.eos_id)),
                     pad_token=config.get("pad_token", piece(spec.pad_id)), unk_token=piece(spec.unk_id),
                     add_bos=config.get("add_bos_token", True), chat_template=config.get("chat_template"),
                     sentencepiece_model=data)


def sentencepiece_backend(pieces: list[tuple[str, float, int]], *, unigram=False, byte_fallback=True,
                           add_dummy_prefix=True, remove_extra_whitespaces=False, charsmap=b"", unk_id=0):
    """SentencePiece's encoder as a `tokenizers` pipeline. `pieces` are (piece, score, type) by id."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    if unigram:
        model = models.Unigram([(p, score) for p, score, _ in pieces], unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        user_defined = any(kind == USER_DEFINED for _, _, kind in pieces)
        model = models.BPE({p: i for i, (p, _, _) in enumerate(pieces)}, _merges_from_scores(pieces),
                           unk_token=pieces[unk_id][0], fuse_unk=True, byte_fallback=byte_fallback,
                           # a user-defined piece is never built by merges: let BPE emit it whole
                           ignore_merges=user_defined)
    backend = Backend(model)
    # SentencePiece's normalization, in its order: character map, extra spaces, dummy prefix, "▁" for " "
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if remove_extra_whitespaces:  # only spaces: newlines and tabs stay
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", "▁"))
    if add_dummy_prefix:
        # a normalizer runs on each stretch of text between special tokens, so like llama.cpp this puts
        # "▁" at the start of the text and after every special token. (Metaspace would skip it when the
        # text already starts with a space, which changes the ids of " Hello".)
        steps.append(normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    user_pieces = sorted((p for p, _, kind in pieces if kind == USER_DEFINED), key=len, reverse=True)
    if user_pieces:  # SentencePiece cuts user-defined pieces out of the text before it merges
        pattern = "|".join(re.escape(p) for p in user_pieces)
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if byte_fallback else []) + [decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, _, kind in pieces if kind in (CONTROL, UNKNOWN)])
    return backend


def _merges_from_scores(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest score.
    As a ranked merge list: every split of a normal piece into two normal pieces, best score first."""
    normal = {p: (-score, i) for i, (p, score, kind) in enumerate(pieces) if kind == NORMAL}
    ranked = []
    for piece, rank in normal.items():
        for k in range(1, len(piece)):
            if piece[:k] in normal and piece[k:] in normal:
                ranked.append((rank, k, piece[:k], piece[k:]))
    return [(left, right) for _, _, left, right in sorted(ranked)]


# ---- GGUF: the vocabulary llama.cpp keeps in the file's metadata ----

# tokenizer.ggml.pre -> the regexes llama.cpp splits text with before byte-level BPE (src/llama-vocab.cpp),
# applied one after another; each keeps both the matches and the text between them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_QWEN2_SPLIT = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZERS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo"], [_GPT2_SPLIT]),
    **dict.fromkeys(["qwen2", "stablelm2", "deepseek-r1-qwen"], [_QWEN2_SPLIT]),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r"], [r"\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe"], [_LLAMA3_SPLIT]),
}
# Llama 3 takes a whole word straight from the vocabulary before trying merges.
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}


def load_gguf(path: Path, reader=None) -> Tokenizer:
    """The vocabulary llama.cpp keeps in a GGUF's metadata (read by checkpoint/gguf.py)."""
    from minillama.checkpoint.gguf import gguf_metadata

    meta = gguf_metadata(path, reader)
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise UserError(f"{path}: this GGUF carries no tokenizer (no tokenizer.ggml.model / tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "llama":  # SentencePiece, with llama.cpp's defaults for missing keys
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        backend = sentencepiece_backend(list(zip(tokens, scores, types)), byte_fallback=BYTE in types,
                                         add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
                                         unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0))
        default_ids = {"bos": 1, "eos": 2, "unknown": 0}
    elif kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise UserError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; "
                            f"supported: {', '.join(PRE_TOKENIZERS)}")
        backend = byte_level_backend(tokens, types, meta.get("tokenizer.ggml.merges") or [], pre)
        default_ids = {}
    else:
        raise UserError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: llama, gpt2)")

    def token(name):
        i = meta.get(f"tokenizer.ggml.{name}_token_id", default_ids.get(name))
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(backend, bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"),
                     unk_token=token("unknown"), add_bos=meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
                     chat_template=meta.get("tokenizer.chat_template"))


def byte_level_backend(tokens: list[str], types: list[int], merges: list[str], pre: str):
    """GPT-2 style BPE: text -> regex pieces -> UTF-8 bytes spelled as printable characters -> merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    model = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges],
                       ignore_merges=pre in IGNORE_MERGES)
    backend = Backend(model)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                        use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # llama.cpp matches control and user-defined tokens whole in the text; only control ones are "special"
    backend.add_tokens([AddedToken(t, special=kind in (CONTROL, UNKNOWN), normalized=False)
                        for t, kind in zip(tokens, types) if kind in (CONTROL, UNKNOWN, USER_DEFINED)])
    return backend
