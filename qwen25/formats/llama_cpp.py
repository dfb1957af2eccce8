"""Opening a GGUF in llama.cpp (through llama-cpp-python), the reader our exports are checked against.

llama-cpp-python is not a dependency of qwen25; tests and benchmarks install it. The one thing
every caller needs beyond `llama_cpp.Llama(...)` is a way to keep llama.cpp off its "extra"
weight buffers: on a CPU with AMX, llama.cpp repacks q8_0/q4_0 weights into an AMX buffer, and
in the builds we test that path segfaults silently in eval. `Llama` exposes no argument for it,
so the model-parameter defaults it reads are swapped for the duration of the load.
"""

from __future__ import annotations

from pathlib import Path


def open_llama(path: str | Path, *, extra_buffers: bool = False, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)`, with llama.cpp's extra (AMX repack) weight
    buffers off unless `extra_buffers` is true."""
    import llama_cpp

    lib = llama_cpp.llama_cpp  # the ctypes module whose defaults llama_cpp.Llama reads
    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_buffers
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        lib.llama_model_default_params = defaults
