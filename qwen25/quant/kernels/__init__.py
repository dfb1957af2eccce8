"""The int8/int4 decode kernels (`qlinear.cpp`), built with g++ on first use, via ctypes.

`load()` returns None when they cannot run here (no compiler, not x86-64, no AVX-512, or
`QWEN25_KERNELS=0`) and `unavailable_reason()` says why; `QuantLinear` then runs the
PyTorch path (dequantise, then matmul). The thread pool is the engine kernels' `pool.h`
(a C++ header, shared so both sets of kernels behave the same on busy machines).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from pathlib import Path

import torch

from qwen25.cext import build_library

SOURCE = Path(__file__).with_name("qlinear.cpp")
HEADER = Path(__file__).with_name("qlinear.h")  # the row kernels, also used by the engine
POOL_HEADER = Path(__file__).parents[2] / "engine" / "kernels" / "pool.h"
FLAGS = ("-O3", "-std=c++20", "-pthread", "-fPIC", "-shared")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


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
                lib = ctypes.CDLL(str(build_library(SOURCE, [POOL_HEADER, HEADER], FLAGS, "qwen25_qlinear")))
                p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                lib.q25q_supported.argtypes, lib.q25q_supported.restype = [], i32
                lib.q25q_linear.argtypes = [i32, p, i64, i64, p, p, p, i64, i64, p, i32]
                lib.q25q_linear.restype = i32
                if lib.q25q_supported():
                    _lib = lib
                else:
                    _reason = "this CPU lacks AVX-512 (F/BW/VL/DQ)"
            except (RuntimeError, OSError) as e:
                _reason = str(e)
        return _lib


def unavailable_reason() -> str | None:
    load()
    return _reason


def supports(bits: int, group_size: int) -> bool:
    """Whether the kernel covers this layout (int8: groups of 16k, int4: groups of 32k)."""
    return (bits == 8 and group_size % 16 == 0) or (bits == 4 and group_size % 32 == 0)


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            bits: int, group_size: int, out_features: int, threads: int | None = None) -> torch.Tensor | None:
    """y [M, N] float32 = x [M, K] @ dequant(W)^T, or None when the kernel cannot run it.

    x is converted to contiguous float32; all other tensors must be contiguous CPU tensors
    in the layouts of `QuantLinear`.
    """
    lib = load()
    if lib is None or not supports(bits, group_size):
        return None
    x = x.to(torch.float32).contiguous()
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.float32)
    rc = lib.q25q_linear(bits, x.data_ptr(), m, k, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                         group_size, out_features, y.data_ptr(), threads or torch.get_num_threads())
    return y if rc == 0 else None
