"""One Tokenizer over the two vocabularies of the Llama 2 family, and chat templates.

SentencePiece BPE (Llama 2, TinyLlama, our own trained ones) and byte-level BPE (GPT-2, Qwen2, SmolLM2)
both become a Hugging Face `tokenizers` pipeline: normalizer -> pre-tokenizer -> BPE model -> decoder.
They come from a folder (tokenizer.json and/or tokenizer.model + tokenizer_config.json), a SentencePiece
`.model`, a `tokenizer.json`, or the vocabulary a `.gguf` carries in its metadata. `save()` writes a
folder that `transformers.AutoTokenizer` reads to the same ids.
"""

import json
import mmap
import os
import re
import struct
from datetime import datetime
from pathlib import Path

import numpy as np

from minillama.config import UserError

# Tokens that end a turn in the chat formats we meet; generation stops on these as well as on EOS.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
               "<|end_of_text|>")

# Used when a checkpoint has no chat template of its own (default_chat_template picks one).
# ChatML, as SmolLM2 and Qwen2 write it:
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 2 chat (Meta's llama/generation.py): every user turn is "<s>[INST] ... [/INST]", the answer follows
# after a space and ends with "</s>"; a system message sits inside the first [INST] between <<SYS>> tags.
LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# SentencePiece piece types (sentencepiece_model.proto); GGUF's tokenizer.ggml.token_type uses the same.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """text <-> token ids, special tokens, chat template. Wraps a `tokenizers.Tokenizer` (the backend)."""

    def __init__(self, backend, *, bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                 add_bos=False, chat_template=None, sentencepiece_model: bytes | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos = add_bos  # whether encode() prepends BOS by default (Llama SentencePiece: yes)
        self.chat_template = chat_template  # the checkpoint's jinja template, or None
        self.sentencepiece_model = sentencepiece_model  # the .model bytes this came from, written back by save()

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eos_ids(self) -> set[int]:
        """Ids that end generation: EOS plus the end-of-turn tokens of chat formats."""
        ids = {i for token, i in self.special_tokens.items() if token in END_OF_TURN}
        return ids | ({self.eos_id} if self.eos_id is not None else set())

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        """Text -> ids. With special=True, special-token text such as <|im_start|> becomes its id (what a
        rendered chat template needs, as in Hugging Face); by default text is only text, so a corpus that
        happens to contain "<s>" cannot inject a BOS."""
        self.backend.encode_special_tokens = not special
        placeholder = self._space_symbol_placeholder(text)
        if placeholder:
            text = text.replace("▁", placeholder)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if placeholder:
            ids = self._replace_bytes(ids, placeholder.encode(), "▁".encode())
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _space_symbol_placeholder(self, text: str) -> str | None:
        """SentencePiece writes spaces as "▁", so a "▁" in the text itself would come back as a space.
        We encode it as a noncharacter absent from the text (byte-fallback pieces, no merges touch it)
        and then swap those byte pieces for the bytes of "▁": decode(encode(text)) == text."""
        if "▁" not in text or self.backend.token_to_id("<0xE2>") is None or self.backend.token_to_id("▁") is None:
            return None
        return next(c for c in map(chr, range(0xFDD0, 0xFDF0)) if c not in text)

    def _replace_bytes(self, ids: list[int], old: bytes, new: bytes) -> list[int]:
        old_ids = [self.backend.token_to_id(f"<0x{b:02X}>") for b in old]
        new_ids = [self.backend.token_to_id(f"<0x{b:02X}>") for b in new]
        out, i, n = [], 0, len(old_ids)
        while i < len(ids):
            if ids[i:i + n] == old_ids:
                out += new_ids
                i += n
            else:
                out.append(ids[i])
                i += 1
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render the conversation as Hugging Face does: sandboxed jinja, trim_blocks + lstrip_blocks."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise UserError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        try:
            template = env.from_string(self.chat_template or self.default_chat_template())
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   pad_token=self.pad_token or "", unk_token=self.unk_token or "", **extra)
        except jinja2.TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    def default_chat_template(self) -> str:
        """For a checkpoint without a template: Llama 2's [INST] format for a SentencePiece vocabulary with
        <s> and no ChatML tokens (Llama 2, our own trained tokenizers), ChatML otherwise."""
        if self.bos_token == "<s>" and self.backend.token_to_id("<|im_start|>") is None:
            return LLAMA2_TEMPLATE
        return CHATML_TEMPLATE

    def save(self, folder) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ tokenizer.model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        special = {name: getattr(self, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        config = {
            # not LlamaTokenizer/GPT2Tokenizer: transformers rebuilds those from vocab + merges with its own
            # pre-tokenizer; the generic class loads tokenizer.json exactly as written
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        files = {
            "tokenizer.json": self._backend_for_saving().to_str(pretty=True).encode(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode(),
            "special_tokens_map.json": json.dumps({k: v for k, v in special.items() if v}, indent=2).encode(),
        }
        if self.sentencepiece_model is not None:
            files["tokenizer.model"] = self.sentencepiece_model
        for name, data in files.items():
            # write then rename, so a crash never leaves a half-written file under the real name
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, folder / name)

    def _backend_for_saving(self):
        """A copy of the backend whose post-processor adds BOS exactly when encode() does by default,
        which is how Hugging Face's encode(text) decides (tokenizer_config's add_bos_token alone is not)."""
        from tokenizers import Tokenizer as Backend
        from tokenizers.processors import TemplateProcessing

        backend = Backend.from_str(self.backend.to_str())
        bos = self.bos_token if self.add_bos and self.bos_id is not None else None
        backend.post_processor = TemplateProcessing(
            single=f"{bos}:0 $A:0" if bos else "$A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1" if bos else "$A:0 $B:1",
            special_tokens=[(bos, self.bos_id)] if bos else [])
        return backend


# ---- loading: dispatch on what the path is ----

def load_tokenizer(path) -> Tokenizer:
    """A folder, a SentencePiece .model, a tokenizer.json, or a .gguf."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such tokenizer file or folder")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".gguf":
        return _load_gguf(path)
    if path.suffix == ".json":
        return _load_tokenizer_json(path, _read_config(path.parent))
    if path.suffix == ".model":
        return _load_sentencepiece(path, _read_config(path.parent) if path.name == "tokenizer.model" else {})
    raise UserError(f"{path}: not a tokenizer (expected a folder, .model, tokenizer.json or .gguf)")


def _load_folder(folder: Path) -> Tokenizer:
    config = _read_config(folder)
    if (folder / "tokenizer.json").exists():  # the full description, added tokens included
        tok = _load_tokenizer_json(folder / "tokenizer.json", config)
        if (folder / "tokenizer.model").exists():
            tok.sentencepiece_model = (folder / "tokenizer.model").read_bytes()
        return tok
    if (folder / "tokenizer.model").exists():
        return _load_sentencepiece(folder / "tokenizer.model", config)
    raise UserError(f"{folder}: no tokenizer.json or tokenizer.model in this folder")


def _read_config(folder: Path) -> dict:
    """tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja) as one dict; {} if absent."""
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).exists():
            try:
                config.update(json.loads((folder / name).read_text(encoding="utf-8")))
            except (ValueError, TypeError) as e:
                raise UserError(f"{folder / name}: not a JSON object ({e})") from None
    if (folder / "chat_template.jinja").exists():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        config["chat_template"] = next((t["template"] for t in template if t.get("name") == "default"), None)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if isinstance(config.get(key), dict):  # a serialized AddedToken
            config[key] = config[key].get("content")
    return config


def _load_tokenizer_json(path: Path, config: dict) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exception for every parse error
        raise UserError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
    # the file's post-processor says which special token Hugging Face puts first, if any
    first = _first_special_token(json.loads(backend.to_str()).get("post_processor") or {})
    return Tokenizer(backend, bos_token=config.get("bos_token", first), eos_token=config.get("eos_token"),
                     pad_token=config.get("pad_token"), unk_token=config.get("unk_token"),
                     add_bos=bool(config.get("add_bos_token", first is not None)),
                     chat_template=config.get("chat_template"))


def _first_special_token(post: dict) -> str | None:
    if post.get("type") == "Sequence":  # e.g. Llama 3: [ByteLevel, TemplateProcessing]
        return next(filter(None, map(_first_special_token, post["processors"])), None)
    if post.get("type") == "TemplateProcessing" and post["single"] and "SpecialToken" in post["single"][0]:
        return post["single"][0]["SpecialToken"]["id"]
    return None


# ---- SentencePiece: a .model file, or a GGUF "llama" vocabulary ----

def _load_sentencepiece(path: Path, config: dict) -> Tokenizer:
    data = path.read_bytes()
    try:
        spec = _read_sentencepiece_model(data)
    except (ValueError, IndexError, TypeError, AttributeError, struct.error) as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    if spec["model_type"] not in (1, 2) or spec["whitespace_as_suffix"]:
        raise UserError(f"{path}: only SentencePiece BPE and unigram models with prefix whitespace are supported")
    pieces = spec["pieces"]

    def piece(i):
        return pieces[i][0] if 0 <= i < len(pieces) else None

    backend = _sentencepiece_backend(pieces, unigram=spec["model_type"] == 1, byte_fallback=spec["byte_fallback"],
                                     add_dummy_prefix=spec["add_dummy_prefix"], unk_id=spec["unk_id"],
                                     remove_extra_whitespaces=spec["remove_extra_whitespaces"],
                                     charsmap=spec["charsmap"])
    return Tokenizer(backend, bos_token=config.get("bos_token", piece(spec["bos_id"])),
                     eos_token=config.get("eos_token", piece(spec["eos_id"])),
                     pad_token=config.get("pad_token", piece(spec["pad_id"])), unk_token=piece(spec["unk_id"]),
                     add_bos=config.get("add_bos_token", True), chat_template=config.get("chat_template"),
                     sentencepiece_model=data)


def _read_sentencepiece_model(data: bytes) -> dict:
    """The fields we use from a ModelProto (sentencepiece_model.proto), read from protobuf wire format
    directly so that the protobuf package is not needed. Absent fields take the proto2 defaults."""
    pieces, trainer, normalizer = [], {}, {}
    for number, value in _protobuf_fields(data):
        if number == 1:  # repeated SentencePiece {1: piece, 2: score (float), 3: type}
            p = dict(_protobuf_fields(value))
            score = struct.unpack("<f", p[2])[0] if 2 in p else 0.0
            pieces.append((p.get(1, b"").decode("utf-8"), score, p.get(3, NORMAL)))
        elif number == 2:
            trainer = dict(_protobuf_fields(value))
        elif number == 3:
            normalizer = dict(_protobuf_fields(value))

    def int32(number, default):  # a negative int32 (pad_id = -1) is a 64-bit two's complement varint
        value = trainer.get(number, default)
        return value - (1 << 64) if value >= 1 << 63 else value

    if not pieces or not 0 <= int32(40, 0) < len(pieces):
        raise ValueError("no pieces, or no unknown piece")
    return {
        "pieces": pieces,
        "model_type": trainer.get(3, 1),  # 1 unigram, 2 BPE
        "whitespace_as_suffix": bool(trainer.get(24, 0)),
        "byte_fallback": bool(trainer.get(35, 0)),
        "unk_id": int32(40, 0),
        "bos_id": int32(41, 1),
        "eos_id": int32(42, 2),
        "pad_id": int32(43, -1),
        "charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
    }


def _protobuf_fields(buf: bytes):
    """Yield (field number, value) of one protobuf message: varints as int, everything else as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:  # length-delimited: string, bytes, nested message
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):  # fixed 64 / 32 bit
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield key >> 3, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _sentencepiece_backend(pieces: list[tuple[str, float, int]], *, unigram=False, byte_fallback=True,
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


def _load_gguf(path: Path) -> Tokenizer:
    meta = read_gguf_metadata(path)
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise UserError(f"{path}: this GGUF carries no tokenizer (no tokenizer.ggml.model / tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "llama":  # SentencePiece, with llama.cpp's defaults for missing keys
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        backend = _sentencepiece_backend(list(zip(tokens, scores, types)), byte_fallback=BYTE in types,
                                         add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
                                         unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0))
        default_ids = {"bos": 1, "eos": 2, "unknown": 0}
    elif kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise UserError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; "
                            f"supported: {', '.join(PRE_TOKENIZERS)}")
        backend = _byte_level_backend(tokens, types, meta.get("tokenizer.ggml.merges") or [], pre)
        default_ids = {}
    else:
        raise UserError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: llama, gpt2)")

    def token(name):
        i = meta.get(f"tokenizer.ggml.{name}_token_id", default_ids.get(name))
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return Tokenizer(backend, bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"),
                     unk_token=token("unknown"), add_bos=meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
                     chat_template=meta.get("tokenizer.chat_template"))


def _byte_level_backend(tokens: list[str], types: list[int], merges: list[str], pre: str):
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


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path) -> dict:
    """The key/value header of a GGUF file (versions 2 and 3) as a dict; the tensors are not read."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic bytes")
            version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported")
            meta, pos = {}, 24
            for _ in range(n_kv):
                key, pos = _gguf_value(buf, pos, 8)
                (kind,) = struct.unpack_from("<I", buf, pos)
                meta[key], pos = _gguf_value(buf, pos + 4, kind)
            return meta
    except (ValueError, struct.error, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None


def _gguf_value(buf, pos: int, kind: int):
    """Read one value of GGUF type `kind` at `pos`; return it and the position after it."""
    if kind == 8:  # string: u64 length + UTF-8 bytes
        (size,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + size > len(buf):
            raise ValueError("string runs past the end of the file")
        return buf[pos + 8:pos + 8 + size].decode("utf-8"), pos + 8 + size
    if kind == 9:  # array: u32 item type + u64 count + items
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in _GGUF_SCALARS:  # numbers in one read
            dtype = np.dtype("<" + _GGUF_SCALARS[item])
            return np.frombuffer(buf, dtype, count, pos).tolist(), pos + dtype.itemsize * count
        values = []
        for _ in range(count):
            value, pos = _gguf_value(buf, pos, item)
            values.append(value)
        return values, pos
    if kind not in _GGUF_SCALARS:
        raise ValueError(f"unknown GGUF value type {kind}")
    fmt = "<" + _GGUF_SCALARS[kind]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
