"""Compile a C++ source with a plain C ABI into a shared library, cached by content.

Used for the CPU kernels (loaded with `ctypes`, which releases the GIL during each call).
Libraries are cached under `$XDG_CACHE_HOME/qwen25/kernels/` (default `~/.cache`), named by
a hash of the sources, flags and compiler, so an edited source is rebuilt; a build writes
to a temporary name and renames it, so concurrent builds (pytest workers) never load a
half-written file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen25" / "kernels"


def compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("c++")


def build_library(source: Path, headers: Sequence[Path], flags: Sequence[str], stem: str) -> Path:
    """Compile `source` (which includes `headers`) once per content; return the .so path.

    The headers' folders are passed as include paths. Raises RuntimeError with the
    compiler's message when there is no compiler or the build fails.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    content = source.read_bytes() + b"".join(h.read_bytes() for h in headers)
    key = hashlib.sha256(content + " ".join(flags).encode() + cxx.encode()).hexdigest()[:16]
    out_dir = cache_dir()
    lib = out_dir / f"{stem}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{d}" for d in sorted({str(h.parent) for h in headers})]
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, *includes, str(source), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {source.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib
