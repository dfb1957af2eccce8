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
interrupted run never leaves a manifest pointing at half-written shards. Every
`checkpoint_mb` MB of text a resume point is saved there (`run.Run.checkpoint`); rerunning
the same command (same config, tokenizer and input files) continues from the last one and
produces the same output as an uninterrupted run. A run that fails before its first resume
point removes its partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen25.data import mixing
from qwen25.data.card import write_card
from qwen25.data.config import DataConfig, declared_domains, to_dict
from qwen25.data.decontam import EvalIndex
from qwen25.data.filters import RULE_NAMES
from qwen25.data.manifest import NAME as MANIFEST, write_manifest
from qwen25.data.run import CHECKPOINT, LENGTH_EDGES, Run, load_checkpoint, safe_name
from qwen25.data.shards import ShardWriter, read_index, read_tokens, separator_id
from qwen25.data.sources import Document, SourceStats, list_files, read_source
from qwen25.data.workers import Skipped, results
from qwen25.errors import UserError


def _mix(run: Run, staging: list, progress: bool = False) -> tuple[list, dict]:
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
        name = f"{safe_name(domain)}.{safe_name(source)}"
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


def _prepare_out(out: Path, fingerprint: str) -> tuple[Path, dict | None]:
    """The work folder `<out>.partial` and the resume point in it for this run (or None: fresh)."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"output folder {out} exists and is not a qwen25 dataset; choose another --out "
                        "or empty it")
    work = out.with_name(out.name + ".partial")
    state = load_checkpoint(work, fingerprint)
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.mkdir(parents=True)
        except OSError as e:
            raise UserError(f"cannot create the output folder {out} ({e.strerror or e}); choose an "
                            "--out in a writable place") from None
    return work, state


def _fingerprint(cfg: DataConfig, tokenizer, files: dict[str, list]) -> str:
    """What a resume point must agree with: the config (but not how many workers run it), the
    tokenizer, and every input file's size and modification time."""
    data = to_dict(cfg)
    data.pop("num_workers")
    inputs = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for fs in files.values() for p, _ in fs]
    blob = json.dumps([data, getattr(tokenizer, "vocab_size", None), separator_id(tokenizer), inputs],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _records(cfg: DataConfig, stats: dict[str, SourceStats], skip_first: int) -> Iterator:
    """Every input record in order, documents and `Skipped` alike, after the first `skip_first`
    (already decided in an earlier, interrupted run)."""
    n = 0
    for src in cfg.sources:
        skipped: list[Skipped] = []
        for doc in read_source(src, lambda r, s, i: skipped.append(Skipped(r, s, i)), stats[src.name],
                               cfg.strict):
            for item in (*skipped, doc):
                n += 1
                if n > skip_first:
                    yield item
            skipped.clear()
        for item in skipped:
            n += 1
            if n > skip_first:
                yield item


def _swap(work: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(cfg: DataConfig, run: Run, tokenizer, stats: dict[str, SourceStats], train: list, val: list,
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
                            "sha256": stats[s.name].sha256, "files_ignored": stats[s.name].files_ignored,
                            "files_not_regular": stats[s.name].files_not_regular}
                   for s in cfg.sources},
        "counts": {"sources": run.ledger.per_source(), "drops": dict(sorted(run.ledger.totals().items())),
                   "domains": {d: dict(c) for d, c in sorted(run.domains.items())}},
        "mix": mix_report,
        "splits": {"train": _split_summary(train), "val": _split_summary(val)},
        "lengths": {"edges": LENGTH_EDGES, "counts": run.lengths.tolist()},
        "shards": [s.__dict__ for s in train + val],
        "listings": {"drops": "drops.jsonl", "decontam": "decontam.jsonl"},
        "quality": ({"scorer": cfg.quality.scorer, "model": cfg.quality.model,
                     "sources": {k: {"scored": n, "mean": total / n, "min": lo, "max": hi}
                                 for k, (n, total, lo, hi) in sorted(run.scores.items())}}
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
    if classifier is None and cfg.mix.classifier_model:
        from qwen25.data.quality import build_classifier

        classifier = build_classifier(cfg.mix.classifier_model, cfg.mix.classifier_tokenizer,
                                      [*sorted(cfg.mix.keywords), cfg.mix.default_domain])
    classifier = classifier or mixing.KeywordClassifier(cfg.mix.keywords, cfg.mix.default_domain)
    fingerprint = _fingerprint(cfg, tokenizer, files)
    out = Path(cfg.out)
    work, state = _prepare_out(out, fingerprint)
    run = Run(cfg, work, tokenizer, scorer, classifier, fingerprint, state)
    if state is not None and progress:
        print(f"resuming {work} after {run.records:,} records ({run.text_bytes / 1e6:.1f} MB of text)",
              file=sys.stderr)
    stats = {s.name: SourceStats() for s in cfg.sources}
    every = int(cfg.checkpoint_mb * 1e6)
    try:
        # Progress in raw input bytes (compressed bytes for .gz), as the ingest reads them.
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress,
                   file=sys.stderr)
        for batch, res in results(cfg, index, _records(cfg, stats, run.records)):
            before = run.text_bytes
            run.decide(batch, res)
            if every and run.text_bytes // every > before // every:
                run.checkpoint()
            bar.update(sum(s.bytes_read for s in stats.values()) - bar.n)
            bar.set_postfix(kept=sum(run.ledger.kept.values()), refresh=False)
        bar.close()
        staging, val = run.close_stage_a()
        train, mix_report = _mix(run, staging, progress)
        shutil.rmtree(work / "staging", ignore_errors=True)
        for p in [work / CHECKPOINT, *work.glob("dedup_*")]:  # resume state is not part of the output
            p.unlink(missing_ok=True)
        run.ledger.close()
        run.ledger.check()
    except BaseException:
        run.ledger.close()
        if not (work / CHECKPOINT).is_file():  # nothing to resume from: leave no trace
            shutil.rmtree(work, ignore_errors=True)
        elif progress:
            print(f"interrupted: rerun the same command to resume from {work / CHECKPOINT}", file=sys.stderr)
        raise
    seconds = time.perf_counter() - t0
    manifest = _manifest(cfg, run, tokenizer, stats, train, val, mix_report,
                         {"seconds": round(seconds, 3), "input_mb_per_s": round(total_bytes / 1e6 / seconds, 3)})
    write_manifest(work, manifest)
    write_card(work, manifest)
    _swap(work, out)
    return out / MANIFEST
