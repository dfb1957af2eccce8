"""The ordered half of a `prepare` run: decisions in input order, writers, resume points.

`Run.decide(batch, results)` takes the workers' results in input order and applies what
depends on order or on everything seen before: the ledger, dedup ("first one wins"),
decontamination drops; survivors wait in `pending` and `flush()` scores them (optional),
tokenises them in one batched call, picks a domain and a split, and appends them to the
staging shard of (split, domain, source). Training documents go to `staging/` (mixed later),
held-out ones straight to `val/`.

Resume points. Every `checkpoint_mb` MB of document text `checkpoint()` makes everything so far
durable: pending documents are written, every open shard is closed (`ShardWriter.roll`), the
listings are flushed, new dedup state is appended to its files, and `checkpoint.json` (the
record count, counters, shard lists, listing lengths) is written last under a temporary name.
`Run(..., state=...)` continues from one: listings are cut back to their recorded lengths,
shard files written after it are removed, dedup state is reloaded, and the caller skips the
records already decided. The output is then the same as an uninterrupted run's.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from qwen25.data.config import DataConfig
from qwen25.data.dedup import Deduplicator
from qwen25.data.ledger import Ledger, reopen
from qwen25.data.shards import ShardWriter, separator_id, tokenize
from qwen25.data.sources import Document
from qwen25.data.workers import Result, Skipped
from qwen25.files import atomic_write

LENGTH_EDGES = [0] + [2**k for k in range(25)]  # document length histogram bins, in tokens
CHECKPOINT = "checkpoint.json"
_TOKENIZE_BYTES = 4 << 20  # survivors are tokenised in one encode_batch call per this many bytes


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def is_val(key: bytes, fraction: float) -> bool:
    """Held out iff the document's content hash falls in the first `fraction` of the range."""
    return fraction > 0 and int.from_bytes(key[:8], "little") < fraction * 2.0**64


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


class Run:
    """The mutable state of one `prepare` call (see module doc). `state`: a checkpoint to resume."""

    def __init__(self, cfg: DataConfig, work: Path, tok, scorer, classifier, fingerprint: str,
                 state: dict | None = None):
        self.cfg, self.work, self.tok, self.scorer, self.classifier = cfg, work, tok, scorer, classifier
        self.fingerprint = fingerprint
        self.eos = separator_id(tok)
        st = state or {}
        self.ledger = Ledger(work / "drops.jsonl", st.get("ledger"))
        self.decontam = reopen(work / "decontam.jsonl", st.get("decontam_bytes"))
        self.dedup = Deduplicator(cfg.dedup)
        self.dedup_saved = st.get("dedup")
        if self.dedup_saved:
            self.dedup.load(work, self.dedup_saved)
        self.records = st.get("records", 0)  # input records decided so far (documents and skips)
        self.text_bytes = st.get("text_bytes", 0)  # their normalised text, in UTF-8 bytes
        self.domains: dict[str, Counter] = defaultdict(Counter)  # kept docs before mixing
        for d, c in st.get("domains", {}).items():
            self.domains[d].update(c)
        self.lengths = np.array(st.get("lengths", [0] * (len(LENGTH_EDGES) - 1)), dtype=np.int64)
        self.scores: dict[str, list[float]] = st.get("scores", {})  # source -> [count, sum, min, max]
        self.pending: list[tuple[Document, Result]] = []  # survivors waiting for tokenisation
        self.pending_bytes = 0
        self.writers: dict[tuple[str, str, str], ShardWriter] = {}
        self.ids: dict[tuple[str, str, str], object] = {}  # staging doc-id listings (train)
        if state is not None:
            self._remove_unlisted_shards(state["writers"])
        for w in st.get("writers", []):
            self._resume_writer(w)

    # ---- writers ------------------------------------------------------------------------------

    def _where(self, split: str, domain: str, source: str) -> tuple[Path, str]:
        return self.work / ("staging" if split == "train" else split), f"{safe_name(domain)}.{safe_name(source)}"

    def writer(self, split: str, domain: str, source: str) -> ShardWriter:
        key = (split, domain, source)
        if key not in self.writers:
            folder, prefix = self._where(*key)
            self.writers[key] = ShardWriter(folder, prefix, self.eos, self.cfg.shard_tokens, root=self.work,
                                            split=split, domain=domain, source=source)
            if split == "train":
                self.ids[key] = reopen(folder / f"{prefix}.ids", None)
        return self.writers[key]

    def _resume_writer(self, w: dict) -> None:
        key = (w["split"], w["domain"], w["source"])
        folder, prefix = self._where(*key)
        self.writers[key] = ShardWriter.resume(w["state"], folder, prefix, self.eos, self.cfg.shard_tokens,
                                               self.work, split=key[0], domain=key[1], source=key[2])
        if key[0] == "train":
            self.ids[key] = reopen(folder / f"{prefix}.ids", w["ids_bytes"])

    def _remove_unlisted_shards(self, writers: list[dict]) -> None:
        """Shard files written after the checkpoint (the interrupted run's) are not the output's."""
        listed = {self.work / s[k] for w in writers for s in w["state"]["shards"] for k in ("path", "index")}
        for folder in (self.work / "staging", self.work / "val"):
            for p in folder.glob("*") if folder.is_dir() else ():
                if p.suffix != ".ids" and p not in listed:
                    p.unlink()

    # ---- decisions ----------------------------------------------------------------------------

    def decide(self, batch: list, results: list[Result]) -> None:
        """Order-dependent decisions (dedup, decontam) for one batch; survivors wait in `pending`."""
        led = self.ledger
        for doc, res in zip(batch, results):
            self.records += 1
            self.text_bytes += res.nbytes
            if isinstance(doc, Skipped):
                led.skip(doc.reason, doc.source, doc.id)
                continue
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
                c = self.scores.setdefault(doc.source, [0, 0.0, s, s])
                c[0], c[1], c[2], c[3] = c[0] + 1, c[1] + s, min(c[2], s), max(c[3], s)
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
            split = "val" if is_val(res.key, self.cfg.val_fraction) else "train"
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

    # ---- resume points ------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Make everything decided so far durable and record the resume point (see module doc)."""
        self.flush()
        writers = []
        for (split, domain, source), w in sorted(self.writers.items()):
            w.roll()
            row = {"split": split, "domain": domain, "source": source, "state": w.state()}
            if split == "train":
                self.ids[(split, domain, source)].flush()
                row["ids_bytes"] = self.ids[(split, domain, source)].tell()
            writers.append(row)
        self.decontam.flush()
        self.dedup_saved = self.dedup.save(self.work, self.dedup_saved)
        state = {"fingerprint": self.fingerprint, "records": self.records, "text_bytes": self.text_bytes,
                 "ledger": self.ledger.state(), "decontam_bytes": self.decontam.tell(),
                 "dedup": self.dedup_saved, "domains": {d: dict(c) for d, c in self.domains.items()},
                 "lengths": self.lengths.tolist(), "scores": self.scores, "writers": writers}
        atomic_write(self.work / CHECKPOINT, json.dumps(state), fsync=True)

    def close_stage_a(self) -> tuple[list, list]:
        """Flush, close the writers: (train staging shards, val shards)."""
        self.flush()
        for f in self.ids.values():
            f.close()
        self.decontam.close()
        shards = [s for w in self.writers.values() for s in w.close()]
        return [s for s in shards if s.split == "train"], [s for s in shards if s.split == "val"]


def load_checkpoint(work: Path, fingerprint: str) -> dict | None:
    """The resume point in `work` if there is one for this exact run (same fingerprint)."""
    try:
        state = json.loads((work / CHECKPOINT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if state.get("fingerprint") == fingerprint else None
