"""Word n-grams as 64-bit hashes: the shared unit of dedup shingles, decontamination and the
repetition rules.

A "word" is a maximal run of bytes of the UTF-8 text that are ASCII letters, digits or "_",
or part of a non-ASCII character (so other scripts form words; ASCII punctuation and
whitespace separate them). Words compare case-insensitively for ASCII letters. This is
Python's `\\w+` for ASCII text, computed without a Python loop per word: byte classes,
run boundaries and a polynomial hash of every run come from a few numpy passes over the
bytes (about 6x faster than `re.findall` plus a per-word hash), which matters because every
document goes through it.

Hashes are deterministic across processes and machines (no salted `hash()`), so worker
processes and reruns agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[list(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")] = True
_WORD_BYTE[0x80:] = True
_FOLD = np.arange(1, 257, dtype=np.uint64)  # byte value + 1 (no zero terms), ASCII lowercased
_FOLD[65:91] += 32
_P = 0x100000001B3  # polynomial base for the bytes of a word
# Odd 64-bit multipliers, one per position inside an n-gram (fixed seed: every process agrees).
_MULTIPLIERS = (np.random.default_rng(0x5157454E).integers(1, 2**63, size=64, dtype=np.uint64)
                * np.uint64(2) + np.uint64(1))
_POWERS = [np.ones(1, np.uint64)]  # P^i, grown to the longest word seen


def _powers(n: int) -> np.ndarray:
    if len(_POWERS[0]) < n:
        steps = np.full(max(n, 2 * len(_POWERS[0]), 256), _P, dtype=np.uint64)
        steps[0] = 1
        _POWERS[0] = np.cumprod(steps, dtype=np.uint64)  # wraps: mod 2^64
    return _POWERS[0][:n]


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: an avalanching bijection on uint64."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


@dataclass
class Words:
    """The words of one text: hashes [n] uint64, byte spans [start, end) into `data`."""

    hashes: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    data: bytes

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def lengths(self) -> np.ndarray:
        """Length of each word in bytes, int64 [n]."""
        return self.ends - self.starts

    def show(self, i: int, j: int) -> str:
        """Words i..j-1 as lowercased text separated by spaces (for reports)."""
        return " ".join(self.data[a:b].decode("utf-8", "replace").lower()
                        for a, b in zip(self.starts[i:j].tolist(), self.ends[i:j].tolist()))


def words(text: str) -> Words:
    """The words of `text` with their hashes (equal words, ASCII case folded, hash equal)."""
    data = text.encode("utf-8")
    b = np.frombuffer(data, dtype=np.uint8)
    edges = np.diff(_WORD_BYTE[b].astype(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) == 0:
        empty = np.empty(0, dtype=np.int64)
        return Words(np.empty(0, dtype=np.uint64), empty, empty, data)
    lengths = ends - starts
    # Each word byte's position inside its word; hash = sum_k fold(byte_k) * P^k (mod 2^64),
    # summed per word with reduceat over the word bytes laid end to end.
    inside = np.flatnonzero(_WORD_BYTE[b])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(inside)) - np.repeat(offsets, lengths)
    terms = _FOLD[b[inside]] * _powers(int(lengths.max()))[pos]
    h = np.add.reduceat(terms, offsets)
    return Words(fmix64(h ^ lengths.astype(np.uint64)), starts, ends, data)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of `n` consecutive word hashes, [max(0, len - n + 1)].

    Order-sensitive: sum over positions j of hash[i + j] * M_j (mod 2^64), M_j odd constants.
    For n > 64 the multipliers repeat cyclically (still order-sensitive enough in practice).
    """
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    for j in range(n):
        out += hashes[j:j + count] * _MULTIPLIERS[j % 64]  # uint64 arithmetic wraps: mod 2^64
    return out


def fold32(h: np.ndarray) -> np.ndarray:
    """64-bit hashes folded to 32 bits (what MinHash's affine32 scheme takes), as uint64."""
    return (h >> np.uint64(32)) ^ (h & np.uint64(0xFFFFFFFF))


def covered_fraction(hashes: np.ndarray, n: int, weights: np.ndarray) -> float:
    """Weight fraction of positions covered by an n-gram that occurs more than once.

    Gopher's "fraction of characters in duplicate n-grams": `weights[i]` is word i's length in
    characters; a word inside several duplicated n-grams counts once.
    """
    grams = ngram_hashes(hashes, n)
    if len(grams) < 2:
        return 0.0
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    dup_start = counts[inverse] > 1
    if not dup_start.any():
        return 0.0
    # Mark words i..i+n-1 for every duplicated start i: +1 at i, -1 at i+n, running sum > 0.
    delta = np.zeros(len(hashes) + 1, dtype=np.int64)
    starts = np.nonzero(dup_start)[0]
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + n, -1)
    covered = np.cumsum(delta[:-1]) > 0
    total = weights.sum()
    return float(weights[covered].sum() / total) if total else 0.0


def top_ngram_fraction(hashes: np.ndarray, n: int, weights: np.ndarray) -> float:
    """Weight fraction taken by the most frequent n-gram (Gopher's "top n-gram" character share).

    Characters of the top n-gram = its count times its character length (as Gopher counts it);
    when several n-grams tie for the highest count, the largest share is reported.
    """
    grams = ngram_hashes(hashes, n)
    total = weights.sum()
    if len(grams) == 0 or not total:
        return 0.0
    _, first, counts = np.unique(grams, return_index=True, return_counts=True)
    top = counts.max()
    if top < 2:
        return 0.0
    window = np.concatenate([[0], np.cumsum(weights)])
    starts = first[counts == top]
    return float(top * (window[starts + n] - window[starts]).max() / total)
