"""`prepare(cfg)`: raw sources -> filtered, deduplicated, decontaminated, mixed token shards.

The straight line (each stage named in the ledger when it drops a document):

  ingest          sources.read_source           invalid_json, missing_text_field, not_utf8, unreadable_file
  normalise       normalize.normalize           empty
  filter          filters.first_failure         filter:<rule>
  dedup           dedup.Deduplicator            exact_duplicate, near_duplicate
  decontaminate   decontam.EvalIndex            decontam_ngram, decontam_lcs
  score           quality.*Scorer               quality_perplexity, quality_judge
  classify+split  mixing.KeywordClassifier, content hash -> train / val
  tokenise        shards.tokenize               eos_in_text
  mix             mixing.rates / select         mix_downsampled
  write           shards.ShardWriter, manifest, card

Parallelism: the per-document work (normalise, filter, MinHash signature, n-gram overlap with
the eval sets) runs in `num_workers` spawned processes on batches of documents, with a
bounded number of batches in flight (memory stays independent of corpus size). The
decisions that depend on order (dedup's "first one wins", the ledger, the writers) run here,
in input order, so the output is identical for any number of workers. Tokenisation uses the
tokenizer's batched encoder (threads, GIL released) on each batch of survivors while the
workers process the next batches.

Output is built in `<out>.partial/` and swapped into `<out>/` only when complete, so an
interrupted run never leaves a manifest pointing at half-written shards. (A rerun starts
over; there is no mid-run resume.)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen25.data import mixing
from qwen25.data.card import write_card
from qwen25.data.config import DataConfig, declared_domains, to_dict
from qwen25.data.decontam import EvalIndex, Hit
from qwen25.data.dedup import Deduplicator, minhash_signature
from qwen25.data.filters import RULE_NAMES, first_failure
from qwen25.data.ledger import Ledger
from qwen25.data.manifest import NAME as MANIFEST, write_manifest
from qwen25.data.ngrams import words
from qwen25.data.normalize import dedup_key, normalize
from qwen25.data.shards import ShardWriter, read_index, read_tokens, separator_id, tokenize
from qwen25.data.sources import Document, SourceStats, list_files, read_source
from qwen25.errors import UserError

LENGTH_EDGES = [0] + [2**k for k in range(25)]  # document length histogram bins, in tokens
_BATCH_BYTES = 4 << 20  # a work unit is at most batch_docs documents or about this many bytes
_TOKENIZE_BYTES = 4 << 20  # survivors are tokenised in one encode_batch call per this many bytes


# --------------------------------------------------------------------------------------
# per-document work (runs in worker processes)
# --------------------------------------------------------------------------------------


@dataclass
class Result:
    """What a worker learned about one document."""

    text: str  # normalised text
    nbytes: int  # UTF-8 bytes of the normalised text
    reason: str | None  # "empty" or "filter:<rule>" when dropped
    key: bytes = b""  # exact-dedup key
    signature: np.ndarray | None = None  # MinHash signature (near-dedup on)
    hit: Hit | None = None  # eval-set overlap


_WORKER: dict = {}


def _init_worker(cfg: DataConfig, index: EvalIndex | None) -> None:
    _WORKER.update(cfg=cfg, index=index, off={s.name: frozenset(s.disable_rules) for s in cfg.sources})


def process_batch(docs: list[Document]) -> list[Result]:
    """The order-independent work for a batch of documents (pure given the worker state)."""
    cfg: DataConfig = _WORKER["cfg"]
    index: EvalIndex | None = _WORKER["index"]
    out = []
    for doc in docs:
        text = normalize(doc.text)
        nbytes = len(text.encode("utf-8"))
        if not text.strip():
            out.append(Result(text, nbytes, "empty"))
            continue
        tokens = words(text)  # shared by the repetition rules, MinHash and decontamination
        rule = first_failure(text, doc.kind, cfg.filters, _WORKER["off"].get(doc.source, frozenset()), tokens)
        if rule:
            out.append(Result(text, nbytes, f"filter:{rule}"))
            continue
        sig = (minhash_signature(tokens.hashes, cfg.dedup.shingle_size, cfg.dedup.num_perm, cfg.dedup.seed)
               if cfg.dedup.near else None)
        hit = index.check(tokens) if index is not None else None
        out.append(Result(text, nbytes, None, dedup_key(text), sig, hit))
    return out


def _batches(docs: Iterator[Document], max_docs: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if len(batch) >= max_docs or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _results(cfg: DataConfig, index, docs: Iterator[Document]) -> Iterator[tuple[list[Document], list[Result]]]:
    """(batch, results) in input order; worker processes keep at most 2 batches each in flight."""
    batches = _batches(docs, cfg.batch_docs)
    if cfg.num_workers == 0:
        _init_worker(cfg, index)
        for batch in batches:
            yield batch, process_batch(batch)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ProcessPoolExecutor(cfg.num_workers, mp_context=ctx, initializer=_init_worker,
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


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def _is_val(key: bytes, fraction: float) -> bool:
    return fraction > 0 and int.from_bytes(key[:8], "little") < fraction * 2.0**64


class _Run:
    """The mutable state of one `prepare` call (writers, counters, listings)."""

    def __init__(self, cfg: DataConfig, work: Path, tok, scorer, classifier):
        self.cfg, self.work, self.tok, self.scorer, self.classifier = cfg, work, tok, scorer, classifier
        self.eos = separator_id(tok)
        self.ledger = Ledger(work / "drops.jsonl")
        self.decontam = open(work / "decontam.jsonl", "w", encoding="utf-8")
        self.dedup = Deduplicator(cfg.dedup)
        self.writers: dict[tuple[str, str, str], ShardWriter] = {}
        self.ids: dict[tuple[str, str, str], object] = {}  # staging doc-id listings (train)
        self.domains: dict[str, Counter] = defaultdict(Counter)  # kept docs before mixing
        self.lengths = np.zeros(len(LENGTH_EDGES) - 1, dtype=np.int64)
        self.scores: dict[str, list[float]] = defaultdict(list)
        self.pending: list[tuple[Document, Result]] = []  # survivors waiting for tokenisation
        self.pending_bytes = 0

    def writer(self, split: str, domain: str, source: str) -> ShardWriter:
        key = (split, domain, source)
        if key not in self.writers:
            folder = self.work / ("staging" if split == "train" else split)
            self.writers[key] = ShardWriter(folder, f"{_safe(domain)}.{_safe(source)}", self.eos,
                                            self.cfg.shard_tokens, root=self.work,
                                            split=split, domain=domain, source=source)
            if split == "train":
                self.ids[key] = open(folder / f"{_safe(domain)}.{_safe(source)}.ids", "w", encoding="utf-8")
        return self.writers[key]

    def decide(self, batch: list[Document], results: list[Result]) -> None:
        """Order-dependent decisions (dedup, decontam) for one batch; survivors wait in `pending`."""
        led = self.ledger
        for doc, res in zip(batch, results):
            led.seen(doc.source, res.nbytes)
            if res.reason:
                led.drop(doc.source, doc.id, res.reason)
                continue
            dup = self.dedup.check(res.key, res.signature, doc.id)
            if dup:
                led.drop(doc.source, doc.id, dup[0], dup[1])
                continue
            if res.hit:
                h = res.hit
                led.drop(doc.source, doc.id, h.rule, f"{h.eval_set}:{h.item}")
                self.decontam.write(_json({"id": doc.id, "source": doc.source, "rule": h.rule,
                                           "eval_set": h.eval_set, "item": h.item, "evidence": h.evidence}))
                continue
            self.pending.append((doc, res))
            self.pending_bytes += res.nbytes
        if self.pending_bytes >= _TOKENIZE_BYTES:
            self.flush()

    def flush(self) -> None:
        """Score, tokenise and write the pending survivors (one batched encode call)."""
        led = self.ledger
        survivors, self.pending, self.pending_bytes = self.pending, [], 0
        if self.scorer is not None and survivors:
            from qwen25.data.quality import threshold_reason

            scores = self.scorer.score([r.text for _, r in survivors])
            kept = []
            for (doc, res), s in zip(survivors, scores):
                self.scores[doc.source].append(s)
                reason = threshold_reason(self.cfg.quality, doc.source, s)
                if reason:
                    led.drop(doc.source, doc.id, reason, f"score={s:.4g}")
                else:
                    kept.append((doc, res))
            survivors = kept
        ids = tokenize(self.tok, [r.text for _, r in survivors])
        for (doc, res), tokens in zip(survivors, ids):
            if (tokens == self.eos).any():
                led.drop(doc.source, doc.id, "eos_in_text")
                continue
            domain = doc.domain or self.classifier(doc)
            split = "val" if _is_val(res.key, self.cfg.val_fraction) else "train"
            self.writer(split, domain, doc.source).add(tokens, res.nbytes)
            if split == "train":
                self.ids[(split, domain, doc.source)].write(doc.id.replace("\n", " ") + "\n")
            led.keep(doc.source)
            c = self.domains[domain]
            c["docs"] += 1
            c["tokens"] += len(tokens) + 1
            c["bytes"] += res.nbytes
            self.lengths[min(int(np.searchsorted(LENGTH_EDGES, len(tokens) + 1, side="right")) - 1,
                             len(self.lengths) - 1)] += 1

    def close_stage_a(self) -> tuple[list, list]:
        """Flush, close the writers: (train staging shards, val shards)."""
        self.flush()
        for f in self.ids.values():
            f.close()
        self.decontam.close()
        shards = [s for w in self.writers.values() for s in w.close()]
        return [s for s in shards if s.split == "train"], [s for s in shards if s.split == "val"]


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _mix(run: _Run, staging: list, progress: bool = False) -> tuple[list, dict]:
    """Write the training shards with the domain mixture applied; returns (shards, mix report)."""
    cfg = run.cfg
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for s in staging:
        groups[(s.domain, s.source)].append(s)
    before = Counter()
    for (domain, _), shards in groups.items():
        before[domain] += sum(s.tokens for s in shards)
    rates = mixing.rates(dict(before), cfg.mix.weights, cfg.mix.total_tokens, cfg.mix.max_repeats)
    after: Counter = Counter()
    out = []
    for (domain, source), shards in sorted(groups.items()):
        name = f"{_safe(domain)}.{_safe(source)}"
        tokens = [read_tokens(run.work / s.path) for s in shards]
        index = np.concatenate([read_index(run.work / s.index) for s in shards])  # [docs, 2]
        # Document j of the group lies in staging shard shard_of[j] at [start[j], end[j]) (EOS last).
        shard_of = np.repeat(np.arange(len(shards)), [s.docs for s in shards])
        end = index[:, 0]
        start = np.where(np.r_[True, shard_of[1:] != shard_of[:-1]], 0, np.r_[0, end[:-1]])
        doc_tokens = end - start
        chosen = mixing.select(doc_tokens, rates.get(domain, 0.0), cfg.mix.seed, f"{domain}/{source}")
        writer = ShardWriter(run.work / "train", name, run.eos, cfg.shard_tokens, root=run.work,
                             split="train", domain=domain, source=source)
        for j in tqdm(chosen.tolist(), desc=f"mix {domain}/{source}", unit="doc", disable=not progress,
                      file=sys.stderr, leave=False):
            writer.add(tokens[shard_of[j]][start[j]:end[j] - 1], int(index[j, 1]))
        out += writer.close()
        after[domain] += sum(s.tokens for s in writer.shards)
        used = np.zeros(len(doc_tokens), dtype=bool)
        used[chosen] = True
        if not used.all():
            with open(run.work / "staging" / f"{name}.ids", encoding="utf-8") as f:
                for j, doc_id in enumerate(f):
                    if not used[j]:
                        run.ledger.unkeep(source, doc_id.rstrip("\n"), "mix_downsampled")
        del tokens
    target = mixing.normalized_weights(cfg.mix.weights, sorted(before)) if cfg.mix.weights else None
    report = {"target": target, "rates": rates, "tokens_before": dict(before), "tokens_after": dict(after),
              "before": mixing.achieved(dict(before)), "achieved": mixing.achieved(dict(after))}
    return out, report


def _split_summary(shards: list) -> dict:
    def agg(key):
        d: dict[str, Counter] = defaultdict(Counter)
        for s in shards:
            c = d[getattr(s, key)]
            c["docs"] += s.docs
            c["tokens"] += s.tokens
            c["bytes"] += s.bytes
        return {k: dict(v) for k, v in sorted(d.items())}

    tokens, nbytes = sum(s.tokens for s in shards), sum(s.bytes for s in shards)
    return {"docs": sum(s.docs for s in shards), "tokens": tokens, "bytes": nbytes,
            "bytes_per_token": nbytes / tokens if tokens else None,
            "domains": agg("domain"), "sources": agg("source")}


def _prepare_out(out: Path) -> Path:
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"output folder {out} exists and is not a qwen25 dataset; choose another --out "
                        "or empty it")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _swap(work: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(cfg: DataConfig, run: _Run, tokenizer, stats: dict[str, SourceStats], train: list, val: list,
              mix_report: dict, timing: dict) -> dict:
    """The manifest of a finished run (schema: `qwen25.data.manifest`)."""
    return {
        "format": "qwen25-shards", "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": "uint32", "eos_token_id": run.eos,
        "tokenizer": {"spec": cfg.tokenizer, "class": type(tokenizer).__name__,
                      "vocab_size": getattr(tokenizer, "vocab_size", None),
                      "eos_token_id": getattr(tokenizer, "eos_token_id", None)},
        "config": to_dict(cfg),
        "inputs": {s.name: {"path": s.path, "files": stats[s.name].files, "bytes": stats[s.name].bytes,
                            "sha256": stats[s.name].sha256, "files_ignored": stats[s.name].files_ignored}
                   for s in cfg.sources},
        "counts": {"sources": run.ledger.per_source(), "drops": dict(sorted(run.ledger.totals().items())),
                   "domains": {d: dict(c) for d, c in sorted(run.domains.items())}},
        "mix": mix_report,
        "splits": {"train": _split_summary(train), "val": _split_summary(val)},
        "lengths": {"edges": LENGTH_EDGES, "counts": run.lengths.tolist()},
        "shards": [s.__dict__ for s in train + val],
        "listings": {"drops": "drops.jsonl", "decontam": "decontam.jsonl"},
        "quality": ({"scorer": cfg.quality.scorer, "model": cfg.quality.model,
                     "sources": {k: {"scored": len(v), "mean": float(np.mean(v)), "min": float(np.min(v)),
                                     "max": float(np.max(v))} for k, v in sorted(run.scores.items())}}
                    if run.scores else None),
        "timing": timing,
    }


def prepare(cfg: DataConfig, tokenizer=None, classifier: Callable[[Document], str] | None = None,
            scorer=None, progress: bool = True) -> Path:
    """Run the pipeline of `cfg`; returns the path of the written `manifest.json`.

    tokenizer: any object with `encode_batch`, `decode`, `eos_token_id` (default:
      `qwen25.load_tokenizer(cfg.tokenizer)`). classifier: Document -> domain for documents
      whose source has no domain (default: the keyword classifier of `cfg.mix`).
    scorer: an object with `score(texts) -> list[float]` (default: from `cfg.quality`).
    """
    t0 = time.perf_counter()
    if not cfg.sources:
        raise UserError("no sources: give at least one (config `sources`, or --source / --builtin)")
    rules = set(cfg.filters.disable_rules).union(*(s.disable_rules for s in cfg.sources))
    if rules - set(RULE_NAMES):
        raise UserError(f"unknown filter rule(s) {sorted(rules - set(RULE_NAMES))}; rules: {list(RULE_NAMES)}")
    if cfg.mix.weights and set(declared_domains(cfg)) - set(cfg.mix.weights):
        raise UserError(f"mix.weights lacks domain(s) {sorted(set(declared_domains(cfg)) - set(cfg.mix.weights))}; "
                        "give every domain a weight (0 drops it)")
    files = {s.name: list_files(s)[0] for s in cfg.sources}  # fails early on a bad path
    total_bytes = sum(p.stat().st_size for fs in files.values() for p, _ in fs)
    if tokenizer is None:
        from qwen25.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    separator_id(tokenizer)  # a clear error now for an unusable tokenizer
    index = EvalIndex(cfg.decontam) if cfg.decontam.eval_sets else None
    if scorer is None and cfg.quality.scorer:
        from qwen25.data.quality import build_scorer  # torch is imported only when scoring

        scorer = build_scorer(cfg.quality)
    classifier = classifier or mixing.KeywordClassifier(cfg.mix.keywords, cfg.mix.default_domain)
    out = Path(cfg.out)
    work = _prepare_out(out)
    run = _Run(cfg, work, tokenizer, scorer, classifier)
    stats = {s.name: SourceStats() for s in cfg.sources}

    def docs() -> Iterator[Document]:
        for src in cfg.sources:
            yield from read_source(src, run.ledger.skip, stats[src.name], cfg.strict)

    try:
        # Progress in raw input bytes (compressed bytes for .gz), as the ingest reads them.
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress,
                   file=sys.stderr)
        for batch, results in _results(cfg, index, docs()):
            run.decide(batch, results)
            bar.update(sum(s.bytes_read for s in stats.values()) - bar.n)
            bar.set_postfix(kept=sum(run.ledger.kept.values()), refresh=False)
        bar.close()
        staging, val = run.close_stage_a()
        train, mix_report = _mix(run, staging, progress)
        shutil.rmtree(work / "staging", ignore_errors=True)
        run.ledger.close()
        run.ledger.check()
    except BaseException:
        run.ledger.close()
        shutil.rmtree(work, ignore_errors=True)  # the previous output, if any, stays untouched
        raise
    seconds = time.perf_counter() - t0
    manifest = _manifest(cfg, run, tokenizer, stats, train, val, mix_report,
                         {"seconds": round(seconds, 3), "input_mb_per_s": round(total_bytes / 1e6 / seconds, 3)})
    write_manifest(work, manifest)
    write_card(work, manifest)
    _swap(work, out)
    return out / MANIFEST
