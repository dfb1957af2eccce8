"""Deduplication: exact (normalised hash) then near-duplicate (MinHash LSH, `datasketch`).

Split in two so the expensive half runs in worker processes:
- `minhash_signature(text, ...)` is a pure function of one document (its word shingles
  hashed and pushed through datasketch's `MinHash`), computed where the document is filtered.
- `Deduplicator` is the sequential half in the driver: it sees documents in input order and
  keeps the first of every cluster, so the result does not depend on the number of workers.

Shingles are runs of `shingle_size` words (`ngrams.words`: punctuation-free, case-folded); a
document shorter than one shingle is a single shingle of all its words. A near duplicate
is a document whose estimated Jaccard similarity to an earlier kept document is at least
`threshold`: LSH proposes candidates (banding chosen by datasketch for the threshold, weighted
toward recall) and the signature agreement confirms them, which removes LSH's false positives.

Memory grows with the number of kept documents, not their size: 16 bytes for the exact key
and the document id, plus 4 * num_perm bytes of signature and the LSH band keys (about 1 KiB per document at the
default 128 permutations). Beyond ~10^7 documents, point datasketch at a Redis storage.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from qwen25.data.config import DedupConfig
from qwen25.data.ngrams import fold32, ngram_hashes, words

_SCHEME = "affine32"  # datasketch >= 2.0: a bijective 32-bit permutation family
_CHUNK = 4096  # shingles per update_batch call: bounds the [chunk, num_perm] temporary


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    """datasketch's permutation parameters for (num_perm, seed), made once per process."""
    return MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations


def _minhash(num_perm: int, seed: int, hashvalues: np.ndarray | None = None) -> MinHash:
    return MinHash(num_perm=num_perm, seed=seed, hashfunc=int, hashvalues=hashvalues,
                   permutations=_permutations(num_perm, seed), scheme=_SCHEME)


def shingle_hashes(hashes: np.ndarray, shingle_size: int) -> np.ndarray:
    """32-bit hashes (as uint64) of the word shingles of a document given its word hashes
    (`ngrams.words(text).hashes`), in order (may repeat)."""
    if len(hashes) == 0:
        return hashes
    n = min(shingle_size, len(hashes))
    return fold32(ngram_hashes(hashes, n))


def minhash_signature(hashes: np.ndarray, shingle_size: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signature [num_perm] uint32 of the document's shingle set (see `shingle_hashes`)."""
    m = _minhash(num_perm, seed)
    shingles = np.unique(shingle_hashes(hashes, shingle_size))
    for i in range(0, len(shingles), _CHUNK):
        m.update_batch(shingles[i:i + _CHUNK].tolist())
    return np.asarray(m.hashvalues, dtype=np.uint32)


def text_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """`minhash_signature` of a text with the config's shingle size and permutations."""
    return minhash_signature(words(text).hashes, cfg.shingle_size, cfg.num_perm, cfg.seed)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The MinHash estimator (as `MinHash.jaccard`): fraction of agreeing signature slots."""
    return float(np.count_nonzero(a == b)) / len(a)


class Deduplicator:
    """Keeps the first document of every exact or near-duplicate cluster, in call order."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.exact_keys: dict[bytes, str] = {}  # normalised-text digest -> first document id
        self._unsaved_exact: list[tuple[bytes, str]] = []  # added since the last `save`
        # Banding tuned for recall: datasketch's default (0.5, 0.5) weights find a pair at the
        # threshold only ~44% of the time (0.87 at J=0.8 for t=0.7, 128 permutations); with
        # (0.1, 0.9) it is 0.92 and 0.998. LSH's extra candidates cost one signature
        # comparison each, which then applies the threshold exactly.
        self.lsh = (MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=cfg.lsh_weights)
                    if cfg.near else None)
        self.signatures: list[np.ndarray] = []  # kept documents' signatures, by LSH key
        self.kept_ids: list[str] = []  # document id of each LSH key (for the listings)

    def check(self, key: bytes, signature: np.ndarray | None, doc_id: str = "") -> tuple[str, str] | None:
        """(reason, id of the kept document it duplicates) if the document is a duplicate,
        else None after remembering it. `key` is `normalize.dedup_key(text)`."""
        if self.cfg.exact:
            first = self.exact_keys.get(key)
            if first is not None:
                return "exact_duplicate", first
            self.exact_keys[key] = doc_id
            self._unsaved_exact.append((key, doc_id))
        if self.lsh is None or signature is None:
            return None
        m = _minhash(self.cfg.num_perm, self.cfg.seed, signature)
        best, best_key = 0.0, -1
        for k in self.lsh.query(m):
            sim = estimated_jaccard(signature, self.signatures[k])
            if sim > best:
                best, best_key = sim, k
        if best >= self.cfg.threshold:
            return "near_duplicate", self.kept_ids[best_key]
        self._insert(signature, doc_id, m)
        return None

    def _insert(self, signature: np.ndarray, doc_id: str, m: MinHash | None = None) -> None:
        key_id = len(self.signatures)
        self.signatures.append(signature)
        self.kept_ids.append(doc_id)
        self.lsh.insert(key_id, m or _minhash(self.cfg.num_perm, self.cfg.seed, signature), check_duplication=False)

    # ---- resume points ------------------------------------------------------------------------
    # The state only grows, so it is appended to files (exact keys, signatures, their document
    # ids) and a resume point is the number of entries of each; see `pipeline`.

    def save(self, folder: Path, done: dict | None) -> dict:
        """Append what was added since `done` (a previous return value) under `folder`."""
        done = done or {"exact": 0, "near": 0}
        keys, self._unsaved_exact = self._unsaved_exact, []
        with open(folder / "dedup_exact.bin", "ab") as f:
            f.write(b"".join(k for k, _ in keys))
        with open(folder / "dedup_exact.ids", "a", encoding="utf-8") as f:
            f.write("".join(i.replace("\n", " ") + "\n" for _, i in keys))
        with open(folder / "dedup_near.bin", "ab") as f:
            for sig in self.signatures[done["near"]:]:
                f.write(np.asarray(sig, dtype="<u4").tobytes())
        with open(folder / "dedup_near.ids", "a", encoding="utf-8") as f:
            f.write("".join(i.replace("\n", " ") + "\n" for i in self.kept_ids[done["near"]:]))
        return {"exact": len(self.exact_keys), "near": len(self.signatures)}

    def load(self, folder: Path, done: dict) -> None:
        """Rebuild the state saved up to `done` (files are cut back to it first)."""
        p = self.cfg.num_perm
        for name, width, count in (("exact", 16, done["exact"]), ("near", 4 * p, done["near"])):
            with open(folder / f"dedup_{name}.bin", "r+b") as f:
                f.truncate(width * count)
            ids_path = folder / f"dedup_{name}.ids"
            ids = ids_path.read_text(encoding="utf-8").split("\n")[:count]
            ids_path.write_text("".join(i + "\n" for i in ids), encoding="utf-8")
            data = (folder / f"dedup_{name}.bin").read_bytes()
            if name == "exact":
                self.exact_keys = {data[16 * i:16 * i + 16]: ids[i] for i in range(count)}
            elif self.lsh is not None:
                sigs = np.frombuffer(data, dtype="<u4").reshape(count, p)
                for sig, doc_id in zip(sigs, ids):
                    self._insert(sig.astype(np.uint32), doc_id)
