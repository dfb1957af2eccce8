"""Pretraining data: ingest -> normalise -> filter -> dedup -> decontaminate -> score -> mix ->
tokenise into uint32 shards + manifest + data card; `PackedLoader` reads them back.

Public entry points (imported on first use, so `import qwen25.data` is free):
  prepare(cfg, tokenizer=None, classifier=None, scorer=None) -> manifest path   (pipeline)
  PackedLoader(manifest | shard paths, seq_len, batch_size, ...)               (loader)
  DataConfig and its parts, from_dict, to_dict                                 (config)
  fetch(), builtin_config(...)                                                  (builtin)
  load_manifest(path)                                                           (manifest)
"""

from importlib import import_module

_EXPORTS = {
    "prepare": "qwen25.data.pipeline",
    "PackedLoader": "qwen25.data.loader",
    "DataConfig": "qwen25.data.config",
    "SourceConfig": "qwen25.data.config",
    "from_dict": "qwen25.data.config",
    "to_dict": "qwen25.data.config",
    "fetch": "qwen25.data.builtin",
    "builtin_config": "qwen25.data.builtin",
    "load_manifest": "qwen25.data.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen25.data' has no attribute {name!r}")
