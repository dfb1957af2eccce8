"""File helpers shared across layers (checkpoints, shards, the built-in corpora, reports).

- `sha256_file`: the digest that manifests and pinned downloads record;
- `atomic_write` / `atomic_path`: a file appears complete or not at all. The data goes to a
  uniquely named temporary file in the destination's folder (same file system, so the final
  `os.replace` is atomic, and two writers never share a temporary), optionally fsynced, then
  replaces the destination; on any error the temporary is removed and the old file stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (memory independent of its size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path | str, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it replaces
    `path` (with the usual file mode, as `open` would create it), else it is deleted.

    For writers that take a file name (safetensors' `save_file`, a compiler's `-o`).
    fsync: flush the file's data to disk before the rename (for state a crash must not lose).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, data: str | bytes, fsync: bool = False) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_path(path, fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
