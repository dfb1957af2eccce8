"""Decontamination: drop training documents that overlap an evaluation set.

Both rules work on "words" (`ngrams.words`: punctuation-free, case-folded), not BPE tokens,
so the stage runs before tokenisation and does not depend on the vocabulary. (The report's
rule is stated on tokens; on words the 13-unit threshold is stricter, as a word is one or
more tokens.)

1. n-gram rule (`decontam_ngram`): the document shares at least one word n-gram
   (n = `ngram`, 13 by default, the common GPT-3 / Qwen practice) with some eval item.

2. LCS rule (`decontam_lcs`), the report's criterion (qwen25-spec §3.1): drop a training
   sequence s_t if some eval sequence s_e has
       |LCS(s_t, s_e)| >= 13  and  |LCS(s_t, s_e)| >= 0.6 * min(|s_t|, |s_e|),
   where LCS is the longest common *subsequence* (not substring) of the two word sequences.
   Made affordable and well-posed on long documents as follows:
   - candidates: only (document, item) pairs whose shared word `lcs_seed`-grams (5 by default)
     cover at least `lcs_seed_fraction` of the item's seed n-grams are examined;
   - s_t: the report's "training sequence" is a bounded sample, while a document may be a
     whole book, where a subsequence of common words matches anything. So s_t ranges over
     the windows [k*m, k*m + 2m) of the document (m = |s_e|) that contain a shared seed;
     every contiguous copy of length <= m lies inside one of them. A document shorter than
     2m is a single window;
   - |LCS| is computed exactly with the bit-parallel algorithm of Allison & Dix (1986) /
     Hyyro (2004): O(|s_t| * |s_e| / w) with Python's big integers as the bit vector.

`EvalIndex.check` returns the first hit (rule, eval set, item id, evidence) for the listing.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen25.data.config import DecontamConfig
from qwen25.data.ngrams import Words, ngram_hashes, words
from qwen25.data.normalize import normalize
from qwen25.errors import UserError


@dataclass(frozen=True)
class Hit:
    """Why a document was dropped: the rule, the eval item, and what matched."""

    rule: str  # "decontam_ngram" | "decontam_lcs"
    eval_set: str
    item: str
    evidence: str  # the shared n-gram, or "lcs=K of |s_t|=A, |s_e|=B"


def lcs_length(a: np.ndarray | list, b: np.ndarray | list) -> int:
    """Length of the longest common subsequence of two sequences (bit-parallel, exact).

    One bit per position of `a`; for each symbol c of `b`: U = V & M[c]; V = (V + U) | (V - U)
    (Hyyro 2004, eq. for LCS); the answer is the number of zero bits of V.
    """
    a = list(a.tolist() if isinstance(a, np.ndarray) else a)
    b = b.tolist() if isinstance(b, np.ndarray) else b
    if len(a) > len(b):  # the shorter one as the bit vector: fewer bits per operation
        a, b = list(b), a
    m = len(a)
    if m == 0:
        return 0
    masks: dict = {}
    for i, c in enumerate(a):
        masks[c] = masks.get(c, 0) | (1 << i)
    full = (1 << m) - 1
    v = full
    for c in b:
        u = v & masks.get(c, 0)
        if u:
            v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


@dataclass
class _Item:
    eval_set: str
    id: str
    hashes: np.ndarray  # word hashes, [m]
    seeds: int  # distinct seed n-grams of the item


def read_eval_items(path: str | Path, fields: tuple[str, ...]) -> list[tuple[str, str]]:
    """(id, text) of every item of an eval file: jsonl(.gz) rows (fields joined by a blank
    line; id from `task_id`/`id` or the line number), or one item per plain text file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"eval set file {p} not found; give a jsonl(.gz) or text file")
    name = p.name.lower()
    if not name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
        return [(p.name, p.read_text(encoding="utf-8", errors="replace"))]
    opener = gzip.open if name.endswith(".gz") else open
    items = []
    with opener(p, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"eval set {p} line {lineno} is not valid JSON") from None
            missing = [k for k in fields if not isinstance(row.get(k), str)]
            if missing:
                raise UserError(f"eval set {p} line {lineno} lacks text field(s) {missing}; "
                                f"set decontam.eval_sets[].fields to its keys ({sorted(row)})")
            item_id = str(row.get("task_id", row.get("id", lineno)))
            items.append((item_id, "\n\n".join(row[k] for k in fields)))
    return items


class EvalIndex:
    """Hash indexes over every eval item's word n-grams; `check(doc_hashes)` finds overlaps."""

    def __init__(self, cfg: DecontamConfig):
        self.cfg = cfg
        self.items: list[_Item] = []
        grams, gram_item, seeds, seed_item = [], [], [], []
        for es in cfg.eval_sets:
            for item_id, text in read_eval_items(es.path, es.fields):
                h = words(normalize(text)).hashes
                k = len(self.items)
                g = np.unique(ngram_hashes(h, cfg.ngram))
                s = np.unique(ngram_hashes(h, cfg.lcs_seed))
                grams.append(g)
                gram_item.append(np.full(len(g), k, dtype=np.int64))
                seeds.append(s)
                seed_item.append(np.full(len(s), k, dtype=np.int64))
                self.items.append(_Item(es.name, item_id, h, len(s)))
        self._grams, self._gram_item = _sorted_index(grams, gram_item)
        self._seeds, self._seed_item = _sorted_index(seeds, seed_item)
        # Most documents share nothing with any eval item: one set test settles them.
        self._gram_set = frozenset(self._grams.tolist())
        self._seed_set = frozenset(self._seeds.tolist())

    def __len__(self) -> int:
        return len(self.items)

    def check(self, doc: Words) -> Hit | None:
        """First overlap of a document (its `ngrams.words(text)`) or None."""
        if not self.items:
            return None
        hashes = doc.hashes
        n = self.cfg.ngram
        doc_grams = ngram_hashes(hashes, n)
        if self._gram_set.isdisjoint(doc_grams.tolist()):
            return self._check_lcs(hashes) if self.cfg.lcs else None
        pos = _lookup(self._grams, doc_grams)
        if len(pos):
            at, k = int(pos[0][0]), int(self._gram_item[pos[0][1]])
            item = self.items[k]
            return Hit("decontam_ngram", item.eval_set, item.id, doc.show(at, at + n))
        if self.cfg.lcs:
            return self._check_lcs(hashes)
        return None

    def _check_lcs(self, hashes: np.ndarray) -> Hit | None:
        cfg = self.cfg
        doc_seeds = ngram_hashes(hashes, cfg.lcs_seed)
        if self._seed_set.isdisjoint(doc_seeds.tolist()):
            return None
        found = _lookup(self._seeds, doc_seeds)
        if not len(found):
            return None
        doc_pos, idx = found[:, 0], found[:, 1]
        items = self._seed_item[idx]
        # Distinct shared seeds per item: an index entry is one (item, seed) pair, so count
        # distinct entries (a seed repeated in the document counts once).
        shared = Counter(self._seed_item[sorted(set(idx.tolist()))].tolist())
        for k, s in sorted(shared.items(), key=lambda t: (-t[1], t[0])):
            item = self.items[k]
            m = len(item.hashes)
            if m < cfg.lcs_min or s < cfg.lcs_seed_fraction * item.seeds:
                continue
            if len(hashes) <= 2 * m:  # the whole document is one window
                starts = [0]
            else:
                starts = sorted({(p // m) * m for p in doc_pos[items == k].tolist()})
            for start in starts:
                window = hashes[start:start + 2 * m]
                lcs = lcs_length(window, item.hashes)
                if lcs >= cfg.lcs_min and lcs >= cfg.lcs_ratio * min(len(window), m):
                    return Hit("decontam_lcs", item.eval_set, item.id,
                               f"lcs={lcs} of |s_t|={len(window)}, |s_e|={m}")
        return None


def _sorted_index(keys: list[np.ndarray], vals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not keys:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    k, v = np.concatenate(keys), np.concatenate(vals)
    order = np.argsort(k, kind="stable")
    return k[order], v[order]


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[(query position, index position)] for every query found, [N, 2] (all index matches)."""
    if len(sorted_keys) == 0 or len(queries) == 0:
        return np.empty((0, 2), dtype=np.int64)
    lo = np.searchsorted(sorted_keys, queries, side="left")
    hi = np.searchsorted(sorted_keys, queries, side="right")
    hit = np.nonzero(hi > lo)[0]
    if len(hit) == 0:
        return np.empty((0, 2), dtype=np.int64)
    counts = hi[hit] - lo[hit]
    qpos = np.repeat(hit, counts)
    ipos = np.concatenate([np.arange(a, b) for a, b in zip(lo[hit], hi[hit])])
    return np.stack([qpos, ipos], axis=1)
