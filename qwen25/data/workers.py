"""The per-document stage: work that depends on one document alone, run in worker processes.

normalise -> `empty`; heuristic rules -> `filter:<rule>`; then, for survivors, the exact-dedup
key, the MinHash signature and the eval-set overlap (the decisions that need order, dedup's
"first one wins", stay in the driver). `results()` streams (batch, results) in input order
with at most two batches per worker in flight, so memory is independent of corpus size and
the output does not depend on the number of workers.

Records that never became documents (`Skipped`: invalid JSON, unreadable file, ...) travel in
the same ordered stream, so the driver accounts for every record in input order (which is
what makes a resume point well defined).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from qwen25.data.config import DataConfig
from qwen25.data.decontam import EvalIndex, Hit
from qwen25.data.dedup import minhash_signature
from qwen25.data.filters import first_failure
from qwen25.data.ngrams import words
from qwen25.data.normalize import dedup_key, normalize
from qwen25.data.sources import Document

_BATCH_BYTES = 4 << 20  # a work unit is at most batch_docs documents or about this many bytes


@dataclass(frozen=True)
class Skipped:
    """An input record that could not become a document (see `sources`), in stream order."""

    reason: str
    source: str
    id: str
    text: str = ""  # (so batches can measure every item alike)


@dataclass
class Result:
    """What a worker learned about one document."""

    text: str  # normalised text
    nbytes: int  # UTF-8 bytes of the normalised text
    reason: str | None  # "empty", "filter:<rule>" or a `Skipped` reason when dropped
    key: bytes = b""  # exact-dedup key
    signature: np.ndarray | None = None  # MinHash signature (near-dedup on)
    hit: Hit | None = None  # eval-set overlap


_WORKER: dict = {}


def init_worker(cfg: DataConfig, index: EvalIndex | None) -> None:
    _WORKER.update(cfg=cfg, index=index, off={s.name: frozenset(s.disable_rules) for s in cfg.sources})


def process_batch(docs: list[Document | Skipped]) -> list[Result]:
    """The order-independent work for a batch of documents (pure given the worker state)."""
    cfg: DataConfig = _WORKER["cfg"]
    index: EvalIndex | None = _WORKER["index"]
    out = []
    for doc in docs:
        if isinstance(doc, Skipped):
            out.append(Result("", 0, doc.reason))
            continue
        text = normalize(doc.text)
        nbytes = len(text.encode("utf-8"))
        if not text.strip():
            out.append(Result(text, nbytes, "empty"))
            continue
        # The words are shared by the repetition rules, MinHash and decontamination; they cost
        # about 40 bytes per character, so they are built only when one of those runs.
        tokens = words(text) if cfg.filters.enabled or cfg.dedup.near or index is not None else None
        rule = first_failure(text, doc.kind, cfg.filters, _WORKER["off"].get(doc.source, frozenset()), tokens)
        if rule:
            out.append(Result(text, nbytes, f"filter:{rule}"))
            continue
        sig = (minhash_signature(tokens.hashes, cfg.dedup.shingle_size, cfg.dedup.num_perm, cfg.dedup.seed)
               if cfg.dedup.near else None)
        hit = index.check(tokens) if index is not None else None
        out.append(Result(text, nbytes, None, dedup_key(text), sig, hit))
    return out


def _batches(docs: Iterator, max_docs: int) -> Iterator[list]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if len(batch) >= max_docs or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def results(cfg: DataConfig, index: EvalIndex | None, docs: Iterator) -> Iterator[tuple[list, list[Result]]]:
    """(batch, results) in input order; worker processes keep at most 2 batches each in flight."""
    batches = _batches(docs, cfg.batch_docs)
    if cfg.num_workers == 0:
        init_worker(cfg, index)
        for batch in batches:
            yield batch, process_batch(batch)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(cfg.num_workers, mp_context=ctx, initializer=init_worker,
                             initargs=(cfg, index)) as pool:
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(process_batch, batch)))
                if len(pending) >= 2 * cfg.num_workers:
                    b, fut = pending.popleft()
                    yield b, fut.result()
            while pending:
                b, fut = pending.popleft()
                yield b, fut.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
