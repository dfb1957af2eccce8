"""Contamination column: which evaluated items share a word n-gram with the training data.

Uses the pretraining pipeline's own units (`qwen25.data.ngrams`: punctuation-free,
case-folded words hashed to 64 bits, and `normalize`), with the same default n = 13 as the
decontamination stage (`qwen25.data.decontam`), so "contaminated" here means exactly "the
decontamination stage would have dropped a training document because of this item".

--train-data is one or more files or folders: .jsonl / .jsonl.gz (a "text" field per row),
.txt files, or a prepared data folder's manifest.json (its sources' text files). Items whose
text has fewer than n words cannot overlap and count as clean.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from qwen25.data.ngrams import ngram_hashes, words
from qwen25.data.normalize import normalize
from qwen25.errors import UserError

NGRAM = 13


def item_text(example) -> str:
    """The part of an example that carries the benchmark's own text (not the few-shot
    prefix): the question and its choices, or the generative question."""
    doc = example.doc or {}
    for key in ("question", "problem", "query", "sentence", "goal", "prompt", "text", "ctx"):
        if isinstance(doc.get(key), str):
            text = doc[key]
            break
    else:
        text = getattr(example, "prompt", "") or example.contexts[0]
    extra = doc.get("choices")
    if isinstance(extra, list) and all(isinstance(c, str) for c in extra):
        text += "\n" + "\n".join(extra)
    return text


def _files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith((".txt", ".jsonl", ".jsonl.gz")))
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"--train-data {p} not found; give jsonl(.gz)/txt files or folders")
    if not out:
        raise UserError(f"--train-data {', '.join(paths)} holds no .txt or .jsonl files")
    return out


def training_texts(paths: Sequence[str]) -> Iterator[str]:
    for f in _files(paths):
        name = f.name
        if name == "manifest.json":
            m = json.loads(f.read_text())
            inputs = [v["path"] for v in m.get("inputs", {}).values() if isinstance(v, dict) and "path" in v]
            if not inputs:
                raise UserError(f"{f} lists no input paths; give the training text files instead")
            yield from training_texts(inputs)
        elif name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        row = json.loads(line)
                        if isinstance(row.get("text"), str):
                            yield row["text"]
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def _grams(text: str, n: int) -> np.ndarray:
    return np.unique(ngram_hashes(words(normalize(text)).hashes, n))


def contaminated(item_texts: Sequence[str], train: Iterable[str], n: int = NGRAM) -> list[bool]:
    """For each item text: does any of its word n-grams occur in some training text?"""
    item_grams = [_grams(t, n) for t in item_texts]
    all_grams = np.unique(np.concatenate(item_grams)) if item_grams else np.empty(0, np.uint64)
    seen = np.zeros(len(all_grams), dtype=bool)
    for doc in train:
        g = _grams(doc, n)
        if len(g) and len(all_grams):
            seen |= np.isin(all_grams, g, assume_unique=True)
    hit = set(all_grams[seen].tolist())
    return [bool(hit.intersection(g.tolist())) for g in item_grams]
