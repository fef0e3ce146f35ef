"""A Tokenizer as the vocabulary llama.cpp reads from a GGUF's metadata: the inverse of vocab.load_gguf.

SentencePiece vocabularies become tokenizer.ggml.model = "llama": every piece with its score and type.
They come from the .model file when the tokenizer has one (ours from `minillama tokenizer train`, Llama
2's), else from the `tokenizers` pipeline (a SentencePiece vocabulary read from a GGUF or a
tokenizer.json), with scores that rank each piece by the first merge that builds it: llama.cpp's
SentencePiece tokenizer reads scores only to choose which adjacent pair to merge next.

Byte-level BPE vocabularies (GPT-2, Qwen2, SmolLM2) become "gpt2": tokens, types, merges and the name of
the pre-tokenizer (tokenizer.ggml.pre), found the way llama.cpp's convert_hf_to_gguf.py finds it (it
hashes the ids of a probe text): the one of the names vocab.py reads back whose regexes split a probe
text into the same ids as the tokenizer we have.
"""

import json
import sys

from minillama.config import UserError
from minillama.tokenizer.vocab import (BYTE, CONTROL, IGNORE_MERGES, NORMAL, PRE_TOKENIZERS, UNKNOWN, UNUSED,
                                       USER_DEFINED, byte_level_backend)

# What pre-tokenizers disagree on: contractions, digit runs, runs of spaces and newlines, letters of other
# scripts, punctuation runs (after convert_hf_to_gguf.py's chktxt)
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶‍🌫️ ✅ 🦙🦙 3 33 333 3333 33333 333333 "
         "3.3 3..3 3...3 កាន់តែពិសេស 我想在apple工作1314151天～ ------======= нещо на Български ''''''```````"
         "\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
         "'D you like some tea? We'Ve a'lL HELLO World's 2024年\r\n\r\nend")


def add_vocab(writer, tokenizer, n_vocab: int) -> None:
    """Write `tokenizer` into a gguf.GGUFWriter's metadata, its token list padded to the model's n_vocab
    rows (llama.cpp wants one token per embedding row)."""
    spec = json.loads(tokenizer.backend.to_str())
    decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
    if tokenizer.sentencepiece_model is not None:
        kind, (tokens, scores, types) = "llama", sentencepiece_pieces(tokenizer)
    elif spec["model"]["type"] == "BPE" and "ByteLevel" in decoder:
        kind, (tokens, scores, types) = "gpt2", token_list(tokenizer)
    elif spec["model"]["type"] == "BPE" and "▁" in decoder:  # spaces are "▁": SentencePiece's
        kind, (tokens, scores, types) = "llama", pipeline_pieces(tokenizer, spec)
    else:
        raise UserError(f"the tokenizer's {spec['model']['type']} pipeline is neither SentencePiece BPE nor "
                        "byte-level BPE, which is what llama.cpp reads; export with --no-tokenizer")
    if len(tokens) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # embedding rows past the last token, as convert_hf_to_gguf.py pads
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores(scores)
        # whether SentencePiece puts "▁" before the text: what the pipeline does to a single letter
        writer.add_add_space_prefix(tokenizer.backend.encode("a", add_special_tokens=False).tokens[0] == "▁a")
    else:
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, spec, tokens, types, merges_of(spec)))
        writer.add_token_merges(merges_of(spec))
        writer.add_add_space_prefix(False)
    for add, token in ((writer.add_bos_token_id, tokenizer.bos_token), (writer.add_eos_token_id, tokenizer.eos_token),
                       (writer.add_unk_token_id, tokenizer.unk_token), (writer.add_pad_token_id, tokenizer.pad_token)):
        if tokenizer.token_id(token) is not None:
            add(tokenizer.token_id(token))
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def token_list(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) by id from the pipeline: added special tokens are CONTROL, other added ones
    USER_DEFINED (matched whole in text), byte pieces <0x..> BYTE, the rest NORMAL, gaps UNUSED."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [f"[PAD{i}]" for i in range(max(vocab.values()) + 1)], [UNUSED] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
        if i in added:
            types[i] = CONTROL if added[i].special else USER_DEFINED
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = BYTE
        else:
            types[i] = NORMAL
    return tokens, [0.0] * len(tokens), types


def sentencepiece_pieces(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types from the SentencePiece .model (sentencepiece_model.proto), then the tokens
    the pipeline adds after them (chat tokens of a fine-tune) as convert_hf_to_gguf.py writes them."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sentencepiece_model)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise UserError("llama.cpp's llama vocabulary tokenizes like SentencePiece BPE; this is a "
                        f"{proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} model, whose ids "
                        "llama.cpp would not reproduce")
    normalizer = proto.normalizer_spec
    if normalizer.precompiled_charsmap or normalizer.remove_extra_whitespaces:
        print(f"note: llama.cpp does not apply SentencePiece's normalization ({normalizer.name}, "
              f"remove_extra_whitespaces={normalizer.remove_extra_whitespaces}); it tokenizes text that "
              "normalization would change differently", file=sys.stderr)
    tokens, scores, types = ([p.piece for p in proto.pieces], [p.score for p in proto.pieces],
                             [p.type for p in proto.pieces])
    extra_tokens, _, extra_types = token_list(tokenizer)
    for i in range(len(tokens), len(extra_tokens)):
        tokens.append(extra_tokens[i])
        scores.append(-1000.0)
        types.append(extra_types[i])
    return tokens, scores, types


def pipeline_pieces(tokenizer, spec: dict) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece pieces from a `tokenizers` BPE pipeline: a piece scores minus the rank of the first
    merge that builds it; pieces no merge builds (single characters) score below every merged one."""
    tokens, _, types = token_list(tokenizer)
    if not spec["model"].get("byte_fallback"):
        types = [NORMAL if kind == BYTE else kind for kind in types]
    if tokenizer.token_id(tokenizer.unk_token) is not None:
        types[tokenizer.token_id(tokenizer.unk_token)] = UNKNOWN
    built = {}
    for rank, (left, right) in enumerate(tuple(m.split(" ", 1)) if isinstance(m, str) else m
                                         for m in spec["model"]["merges"]):
        built.setdefault(left + right, rank)
    n = len(built) + len(tokens)
    scores = [-float(built.get(t, n + i)) if kind == NORMAL else 0.0
              for i, (t, kind) in enumerate(zip(tokens, types))]
    return tokens, scores, types


def merges_of(spec: dict) -> list[str]:
    """The BPE merges as GGUF stores them, "left right" (tokenizer.json has pairs, or such strings)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]


def pre_tokenizer_name(tokenizer, spec: dict, tokens: list[str], types: list[int], merges: list[str]) -> str:
    """The tokenizer.ggml.pre name of a byte-level pipeline: the one whose regexes it splits with, when it
    came from a GGUF (vocab.py built it); else the one that gives the same ids as `tokenizer` on PROBE."""
    steps = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    regexes = [step["pattern"].get("Regex") for step in steps if step["type"] == "Split"]
    for name, known in PRE_TOKENIZERS.items():
        if regexes == known and (name in IGNORE_MERGES) == bool(spec["model"].get("ignore_merges")):
            return name
    want = tokenizer.encode(PROBE, bos=False)
    tried = set()
    for name, regexes in PRE_TOKENIZERS.items():
        key = (tuple(regexes), name in IGNORE_MERGES)
        if key in tried:  # another name for a pre-tokenizer already tried
            continue
        tried.add(key)
        candidate = byte_level_backend(tokens, types, merges, name)
        candidate.encode_special_tokens = True  # text is only text, as tokenizer.encode does by default
        if candidate.encode(PROBE, add_special_tokens=False).ids == want:
            return name
    raise UserError("the tokenizer splits text unlike every pre-tokenizer llama.cpp knows by name "
                    f"({', '.join(PRE_TOKENIZERS)}); export with --no-tokenizer")
