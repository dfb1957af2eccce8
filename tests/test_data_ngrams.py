"""Word segmentation and n-gram statistics vs slow explicit implementations; LCS vs the DP."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen25.data.decontam import lcs_length
from qwen25.data.ngrams import covered_fraction, ngram_hashes, top_ngram_fraction, words

# Reference segmentation: runs of ASCII word characters or non-ASCII characters.
_REF_WORD = re.compile(r"(?:[0-9A-Za-z_]|[^\x00-\x7f])+")


def _ref_words(text: str) -> list[bytes]:
    return [m.group().encode().translate(bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                                                         b"abcdefghijklmnopqrstuvwxyz"))
            for m in _REF_WORD.finditer(text)]


_TEXT = st.text(st.sampled_from(list("abcAB xyz Z_09.,;-\n\té߀日本—")), max_size=120)


@given(_TEXT)
@settings(max_examples=400, deadline=None)
def test_words_match_reference_segmentation_and_hash_equality(text):
    w = words(text)
    ref = _ref_words(text)
    assert [w.data[a:b].lower() for a, b in zip(w.starts.tolist(), w.ends.tolist())] == ref
    by_word: dict[bytes, int] = {}
    for h, r in zip(w.hashes.tolist(), ref):
        assert by_word.setdefault(r, h) == h  # equal words, equal hashes
    assert len(set(by_word.values())) == len(by_word)  # distinct words, distinct hashes


def test_word_hashes_agree_across_texts_and_case():
    a, b = words("Hello, World!"), words("world HELLO")
    assert a.hashes[0] == b.hashes[1] and a.hashes[1] == b.hashes[0]
    assert len(words("")) == 0 and len(words(" ... ")) == 0


def _ref_covered(tokens: list[int], n: int, weights: list[int]) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(tokens)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(weights)
    return sum(w for w, c in zip(weights, covered) if c) / total if total else 0.0


def _ref_top(tokens: list[int], n: int, weights: list[int]) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    top = max(counts.values())
    if top < 2:
        return 0.0
    # Among n-grams tied for the top count, the largest character share.
    return max(top * sum(weights[grams.index(g):grams.index(g) + n])
               for g, c in counts.items() if c == top) / sum(weights)


@given(st.lists(st.integers(0, 4), max_size=60), st.integers(1, 6), st.data())
@settings(max_examples=400, deadline=None)
def test_repetition_statistics_match_explicit_counts(tokens, n, data):
    weights = data.draw(st.lists(st.integers(1, 9), min_size=len(tokens), max_size=len(tokens)))
    h = np.array(tokens, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(1)
    w = np.array(weights, dtype=np.int64)
    assert abs(covered_fraction(h, n, w) - _ref_covered(tokens, n, weights)) < 1e-12
    assert abs(top_ngram_fraction(h, n, w) - _ref_top(tokens, n, weights)) < 1e-12


def test_ngram_hashes_are_order_sensitive_and_aligned():
    h = words("a b c a b c b a c").hashes
    g = ngram_hashes(h, 3)
    assert len(g) == 7 and g[0] == g[3] and g[0] != g[6] and len(ngram_hashes(h, 10)) == 0


def _lcs_dp(a, b) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@given(st.lists(st.integers(0, 5), max_size=70), st.lists(st.integers(0, 5), max_size=70))
@settings(max_examples=500, deadline=None)
def test_bit_parallel_lcs_equals_dynamic_programming(a, b):
    assert lcs_length(a, b) == _lcs_dp(a, b)
    assert lcs_length(np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)) == _lcs_dp(a, b)
