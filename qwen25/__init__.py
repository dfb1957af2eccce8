"""qwen25: the Qwen2.5 technical report, implemented in PyTorch.

Public surface (stable): `ModelConfig`, `build_model`, `load_model`, `save_model`,
`load_tokenizer`, `Engine`. Attributes are imported on first use, so `import qwen25` does no
work (the CLI starts fast and `--help` never loads torch).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "qwen25.config",
    "RopeScaling": "qwen25.config",
    "DCAConfig": "qwen25.config",
    "build_model": "qwen25.model.model",
    "Transformer": "qwen25.model.model",
    "KVCache": "qwen25.model.kv_cache",
    "load_model": "qwen25.checkpoint",
    "save_model": "qwen25.checkpoint",
    "load_tokenizer": "qwen25.tokenizer",
    "Engine": "qwen25.engine.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen25' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
