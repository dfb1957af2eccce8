"""Build and load the CPU decode kernels (`decode.cpp`, `kernels.h`, `pool.h`) on first use.

The C++ file has a plain C ABI and no torch or Python headers, so it compiles with `g++` in
a couple of seconds and is loaded with `ctypes` (which releases the GIL during each call).
The library is cached under `$XDG_CACHE_HOME/qwen25/kernels/` (default `~/.cache`), named by
a hash of the source and the flags, so an edited source is rebuilt and concurrent builds
(pytest workers) never see a half-written file (write to a temporary name, then rename).

Everything degrades cleanly: no compiler, a failed build, or a non-x86 CPU make `load()`
return None and `unavailable_reason()` say why; the engine then decodes with the PyTorch
model. Setting `QWEN25_KERNELS=0` turns the kernels off.

ISAs: "avx512" needs AVX-512F/BW (fp32 weights) and AVX-512 BF16 (bf16 weights); "portable"
is plain C++ that any x86-64 CPU runs (slow; it exists so tests exercise the C++ decoder on
every machine).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

from qwen25.files import atomic_path

SOURCE = Path(__file__).with_name("decode.cpp")
HEADERS = ("kernels.h", "pool.h")  # included by decode.cpp
FLAGS = ("-O3", "-std=c++20", "-fopenmp-simd", "-pthread", "-fPIC", "-shared")
ISAS = {"portable": 0, "avx512": 1}
DTYPE_CODES = {"float32": 0, "bfloat16": 1}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen25" / "kernels"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("c++")


def build() -> Path:
    """Compile decode.cpp (once per source version) and return the path of the library.

    Raises RuntimeError with the compiler's message when the build fails.
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    sources = SOURCE.read_bytes() + b"".join(SOURCE.with_name(h).read_bytes() for h in HEADERS)
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + cxx.encode()).hexdigest()[:16]
    out_dir = cache_dir()
    lib = out_dir / f"qwen25_decode-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(lib) as tmp:  # a concurrent build never sees a half-written library
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q25_cpu_supports.argtypes, lib.q25_cpu_supports.restype = [i32], i32
    lib.q25_decoder_new.argtypes = [i32, i32, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                    p, p, p, p, p, i64, i64]
    lib.q25_decoder_new.restype = p
    lib.q25_decoder_free.argtypes, lib.q25_decoder_free.restype = [p], None
    lib.q25_decoder_step.argtypes = [p, i64, p, p, p, p, p, p, p, p, i32]
    lib.q25_decoder_step.restype = i32
    lib.q25_linear.argtypes = [i32, i32, p, p, i64, i64, i64, p, i32]
    lib.q25_linear.restype = i32
    lib.q25_read_sum.argtypes, lib.q25_read_sum.restype = [p, i64, i32], ctypes.c_double


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use; None when it cannot be used here."""
    global _lib, _reason, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("QWEN25_KERNELS", "1") == "0":
            _reason = "disabled by QWEN25_KERNELS=0"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            _reason = f"the kernels are written for x86-64, this CPU is {platform.machine()}"
        else:
            try:
                lib = ctypes.CDLL(str(build()))
                _declare(lib)
                _lib = lib
            except (RuntimeError, OSError) as e:
                _reason = str(e)
        return _lib


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None when the library loaded)."""
    load()
    return _reason


def best_isa(dtype_name: str) -> str | None:
    """'avx512' when this CPU runs the fast kernels for `dtype_name`, else None."""
    lib = load()
    if lib is None or dtype_name not in DTYPE_CODES:
        return None
    return "avx512" if lib.q25_cpu_supports(DTYPE_CODES[dtype_name]) else None
