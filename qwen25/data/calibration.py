"""Calibration windows for post-training quantization (GPTQ): text -> token-id windows.

Text comes through the ingest reader (sources.py: files, folders, globs; text, jsonl,
parquet), is tokenized with the checkpoint's tokenizer, concatenated with the end-of-text
token between documents, and cut into `samples` windows of `seq_len` tokens taken at evenly
spaced offsets of the stream (deterministic; no shuffling needed for a Hessian estimate).
The default is the built-in Shakespeare corpus (`qwen25 data fetch`).
"""

from __future__ import annotations

import glob
from pathlib import Path

import torch

from qwen25.data.builtin import builtin_sources
from qwen25.data.config import SourceConfig
from qwen25.data.sources import SourceStats, read_source
from qwen25.errors import UserError


def calibration_windows(tokenizer, paths: list[str] | None = None, samples: int = 128, seq_len: int = 512,
                        eos_id: int | None = None) -> list[torch.Tensor]:
    """`samples` windows [1, seq_len] int64 of token ids (fewer, shorter ones if the text is short)."""
    if samples <= 0 or seq_len <= 1:
        raise UserError(f"calibration needs samples > 0 and seq_len > 1 (got {samples}, {seq_len})")
    if paths:
        sources = [SourceConfig(f"calib{i}", p, chunk_chars=8000) for i, p in enumerate(paths)]
        for src in sources:
            if not glob.glob(src.path):
                raise UserError(f"calibration file {src.path!r} not found; pass text/jsonl/parquet files")
    else:
        sources = [s for s in builtin_sources() if s.name == "shakespeare"]
        if not Path(sources[0].path).exists():
            raise UserError("no calibration text: pass --calibration FILE, or run `qwen25 data fetch` "
                            "for the built-in corpus")
    need = samples * seq_len
    ids: list[int] = []
    skipped = []
    for src in sources:
        for doc in read_source(src, lambda reason, source, doc_id: skipped.append(reason), SourceStats()):
            ids.extend(tokenizer.encode(doc.text))
            if eos_id is not None:
                ids.append(eos_id)
            if len(ids) >= 4 * need:  # plenty to spread the windows over
                break
    if len(ids) < 2:
        raise UserError("the calibration text is empty")
    stream = torch.tensor(ids, dtype=torch.long)
    seq_len = min(seq_len, len(ids))
    count = min(samples, max(1, len(ids) // seq_len))
    starts = torch.linspace(0, len(ids) - seq_len, count).long()
    return [stream[s:s + seq_len][None] for s in starts.tolist()]
