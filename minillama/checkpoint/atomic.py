"""Writing without ever leaving half a file: every writer in minillama goes through these helpers.

A file or folder is written under a temporary name beside its target (the same file system, so the
rename is atomic) and renamed into place when complete. A crash or Ctrl-C leaves the old version or the
new one, never a mix, and the temporary is removed.
"""

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file renamed into place."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path):
    """`with atomic_file(path) as tmp:` write the file `tmp` (for writers that want a path, such as gguf's);
    on success it replaces `path`; on an error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder):
    """`with atomic_folder(folder) as tmp:` fill `tmp`; on success it replaces `folder` (which may exist:
    the old one steps aside, the new one steps in, then the old one is deleted); on an error it is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old)
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
