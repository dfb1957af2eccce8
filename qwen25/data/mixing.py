"""Domain mixing: a domain per document, then repeats / down-sampling toward target weights.

The report classifies documents by domain with Qwen2-Instruct, down-samples over-represented
domains and up-samples high-value ones (qwen25-spec §3.1; no proportions published). Here:

- Domain: the source's own `domain`, else `KeywordClassifier` (lowercased word counts against
  per-domain keyword lists), else, with `mix.classifier_model`, a chat checkpoint choosing
  among the same domains (`quality.ModelDomainClassifier`, the report's approach). Any
  callable `Document -> str` can replace either through `pipeline.prepare(..., classifier=...)`.
- Rates: domain d holds T_d tokens before mixing; with weights w (normalised over the domains
  that have tokens) and a total T* (default sum T_d), the rate is r_d = w_d * T* / T_d,
  optionally capped at `max_repeats`.
- Selection (`select`, deterministic given the seed): every document is written floor(r_d)
  times, and for the fractional part documents are taken in a seeded random order until
  frac(r_d) * T_d tokens are reached (so the achieved share misses the target by at most one
  document per group). The output order is a seeded shuffle, so repeats are spread out.
  Documents written zero times are counted as `mix_downsampled`.
The achieved mixture is reported next to the target in the manifest and the data card.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter

import numpy as np

from qwen25.data.sources import Document

_WORD = re.compile(r"\w+")


class KeywordClassifier:
    """Domain = the one whose keywords occur most often in the document (ties: sorted name).

    `keywords`: domain -> words (matched case-insensitively as whole words);
    `default`: the domain when no keyword occurs. Looks at the first `max_chars` characters.
    """

    def __init__(self, keywords: dict[str, tuple[str, ...]], default: str = "general", max_chars: int = 20_000):
        self.default, self.max_chars = default, max_chars
        self.lookup: dict[str, list[str]] = {}
        for domain in sorted(keywords):
            for kw in keywords[domain]:
                self.lookup.setdefault(kw.lower(), []).append(domain)

    def __call__(self, doc: Document) -> str:
        if not self.lookup:
            return self.default
        counts: Counter[str] = Counter()
        for w in _WORD.findall(doc.text[: self.max_chars].lower()):
            for domain in self.lookup.get(w, ()):
                counts[domain] += 1
        if not counts:
            return self.default
        best = max(counts.values())
        return min(d for d, c in counts.items() if c == best)


def normalized_weights(weights: dict[str, float], domains: list[str]) -> dict[str, float]:
    """Target shares over `domains` (those with tokens). Empty `weights` means natural (None)."""
    present = {d: weights.get(d, 0.0) for d in domains}
    total = sum(present.values())
    if total <= 0:
        raise ValueError("every domain that has documents has target weight 0")
    return {d: w / total for d, w in present.items()}


def rates(domain_tokens: dict[str, int], weights: dict[str, float], total_tokens: int = 0,
          max_repeats: float = 0.0) -> dict[str, float]:
    """Sampling rate per domain (1.0: unchanged; 2.5: every document 2-3 times; 0.3: 30% of tokens)."""
    present = {d: t for d, t in domain_tokens.items() if t > 0}
    if not weights:
        natural = 1.0 if not total_tokens else total_tokens / max(1, sum(present.values()))
        out = {d: natural for d in present}
    else:
        target_total = total_tokens or sum(present.values())
        w = normalized_weights(weights, sorted(present))
        out = {d: w[d] * target_total / present[d] for d in present}
    if max_repeats > 0:
        out = {d: min(r, max_repeats) for d, r in out.items()}
    return out


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def select(doc_tokens: np.ndarray, rate: float, seed: int, key: str) -> np.ndarray:
    """Indices of the documents to write, with repeats, in output order (see module doc).

    doc_tokens: tokens per document [n]; key: names the group (e.g. "domain/source") so each
    group has its own random stream.
    """
    n = len(doc_tokens)
    if n == 0 or rate <= 0:
        return np.empty(0, dtype=np.int64)
    rng = _rng(seed, key)
    whole = int(math.floor(rate))
    frac_target = (rate - whole) * float(doc_tokens.sum())
    order = rng.permutation(n)
    before = np.cumsum(doc_tokens[order]) - doc_tokens[order]  # tokens taken before each doc
    extra = order[before < frac_target] if frac_target > 0 else np.empty(0, dtype=np.int64)
    chosen = np.concatenate([np.tile(np.arange(n), whole), extra]).astype(np.int64)
    return chosen[rng.permutation(len(chosen))]


def achieved(tokens_by_domain: dict[str, int]) -> dict[str, float]:
    """Share of each domain in a token count mapping."""
    total = sum(tokens_by_domain.values())
    return {d: (t / total if total else 0.0) for d, t in sorted(tokens_by_domain.items())}
