"""One Tokenizer over the two vocabularies of the Llama 2 family.

SentencePiece BPE (Llama 2, TinyLlama, our own trained ones) and byte-level BPE (GPT-2, Qwen2, SmolLM2)
both become a Hugging Face `tokenizers` pipeline: normalizer -> pre-tokenizer -> BPE model -> decoder.
They come from a folder (tokenizer.json and/or tokenizer.model + tokenizer_config.json), a SentencePiece
`.model`, a `tokenizer.json`, or the vocabulary a `.gguf` carries in its metadata (vocab.py builds those).
`save()` writes a folder that `transformers.AutoTokenizer` reads to the same ids. The chat template is
kept here as text; infer/templates.py renders it.
"""

import json
from pathlib import Path

from minillama.checkpoint.atomic import write_atomic
from minillama.config import UserError

# Tokens that end a turn in the chat formats we meet; generation stops on these as well as on EOS.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
               "<|end_of_text|>")


class Tokenizer:
    """text <-> token ids, special tokens, chat template. Wraps a `tokenizers.Tokenizer` (the backend)."""

    def __init__(self, backend, *, bos_token=None, eos_token=None, pad_token=None, unk_token=None,
                 add_bos=False, chat_template=None, sentencepiece_model: bytes | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos = add_bos  # whether encode() prepends BOS by default (Llama SentencePiece: yes)
        self.chat_template = chat_template  # the checkpoint's jinja template, or None
        self.sentencepiece_model = sentencepiece_model  # the .model bytes this came from, written back by save()

    def token_id(self, token: str | None) -> int | None:
        """The id of a token written out ("<|im_end|>"), or None if the vocabulary lacks it."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

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
            write_atomic(folder / name, data)

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
    from minillama.tokenizer import vocab

    if path.suffix == ".gguf":
        return vocab.load_gguf(path)
    if path.suffix == ".json":
        return _load_tokenizer_json(path, _read_config(path.parent))
    if path.suffix == ".model":
        return vocab.load_sentencepiece(path, _read_config(path.parent) if path.name == "tokenizer.model" else {})
    raise UserError(f"{path}: not a tokenizer (expected a folder, .model, tokenizer.json or .gguf)")


def _load_folder(folder: Path) -> Tokenizer:
    config = _read_config(folder)
    if (folder / "tokenizer.json").exists():  # the full description, added tokens included
        tok = _load_tokenizer_json(folder / "tokenizer.json", config)
        if (folder / "tokenizer.model").exists():
            tok.sentencepiece_model = (folder / "tokenizer.model").read_bytes()
        return tok
    if (folder / "tokenizer.model").exists():
        from minillama.tokenizer.vocab import load_sentencepiece

        return load_sentencepiece(folder / "tokenizer.model", config)
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
    post = backend.post_processor  # its JSON alone, not the whole tokenizer's (50k merges as Python objects)
    first = _first_special_token(json.loads(post.__getstate__()) if post is not None else {})
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
