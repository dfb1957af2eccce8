"""The ledger: every input document is either in the output or counted under a named reason.

Counts are kept per source: `docs_in` (every record the ingest saw, including the ones that
could not become documents), `kept` (documents written to a shard at least once) and
`drops[reason]`. `check()` asserts the invariant

    docs_in == kept + sum(drops)            for every source

and the pipeline calls it before writing the manifest, so a stage that forgets to account
for a document fails the run instead of losing it quietly. Every drop is also appended to
`drops.jsonl` (id, source, reason, detail) for the audit trail.

Reasons: ingest skips (`invalid_json`, `missing_text_field`, `not_utf8`, `unreadable_file`),
`empty` (nothing left after normalisation), `filter:<rule>`, `exact_duplicate`,
`near_duplicate`, `decontam_ngram`, `decontam_lcs`, `quality_perplexity`, `quality_judge`,
`eos_in_text` (the text encodes to the document separator), `mix_downsampled`.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import TextIO


class LedgerError(RuntimeError):
    """The accounting does not add up: a bug in a stage, never a user mistake."""


class Ledger:
    def __init__(self, listing: Path | None = None, state: dict | None = None):
        """listing: where drops are appended. state: a `state()` to continue from (the listing
        is then cut back to the length it had when that state was taken)."""
        self.docs_in: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()
        self.drops: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._listing: TextIO | None = None
        if state is not None:
            self.docs_in.update(state["docs_in"])
            self.bytes_in.update(state["bytes_in"])
            self.kept.update(state["kept"])
            for source, reasons in state["drops"].items():
                self.drops[source].update(reasons)
        if listing is not None:
            self._listing = reopen(listing, state["listing_bytes"] if state else None)

    def state(self) -> dict:
        """Counters and the listing's length, JSON-ready (flushes the listing)."""
        if self._listing is not None:
            self._listing.flush()
        return {"docs_in": dict(self.docs_in), "bytes_in": dict(self.bytes_in), "kept": dict(self.kept),
                "drops": {s: dict(c) for s, c in self.drops.items()},
                "listing_bytes": self._listing.tell() if self._listing is not None else 0}

    # ---- recording ----------------------------------------------------------------------

    def seen(self, source: str, nbytes: int) -> None:
        """A document entered the pipeline."""
        self.docs_in[source] += 1
        self.bytes_in[source] += nbytes

    def skip(self, reason: str, source: str, doc_id: str) -> None:
        """An input record that never became a document: counted as input and as a drop."""
        self.docs_in[source] += 1
        self.drop(source, doc_id, reason)

    def drop(self, source: str, doc_id: str, reason: str, detail: str = "") -> None:
        self.drops[source][reason] += 1
        if self._listing is not None:
            row = {"id": doc_id, "source": source, "reason": reason}
            if detail:
                row["detail"] = detail
            self._listing.write(json.dumps(row, ensure_ascii=False) + "\n")

    def keep(self, source: str, n: int = 1) -> None:
        self.kept[source] += n

    def unkeep(self, source: str, doc_id: str, reason: str) -> None:
        """A kept document removed later (down-sampling): moves it from kept to a drop."""
        self.kept[source] -= 1
        self.drop(source, doc_id, reason)

    # ---- reading ------------------------------------------------------------------------

    def totals(self) -> Counter[str]:
        """Drops per reason over all sources."""
        out: Counter[str] = Counter()
        for c in self.drops.values():
            out.update(c)
        return out

    def check(self) -> None:
        """Raise `LedgerError` unless docs_in == kept + drops for every source."""
        for source in set(self.docs_in) | set(self.kept) | set(self.drops):
            dropped = sum(self.drops[source].values())
            if self.docs_in[source] != self.kept[source] + dropped:
                raise LedgerError(f"source {source!r}: {self.docs_in[source]} documents in, "
                                  f"{self.kept[source]} kept + {dropped} dropped")

    def per_source(self) -> dict[str, dict]:
        return {s: {"docs_in": self.docs_in[s], "bytes_in": self.bytes_in[s], "kept": self.kept[s],
                    "drops": dict(sorted(self.drops[s].items()))}
                for s in sorted(set(self.docs_in) | set(self.drops))}

    def close(self) -> None:
        if self._listing is not None:
            self._listing.close()
            self._listing = None


def reopen(path: Path, size: int | None) -> TextIO:
    """A text file for appending: new (size None) or cut back to `size` bytes (a resume point)."""
    if size is None:
        return open(path, "w", encoding="utf-8")
    with open(path, "r+b") as f:
        f.truncate(size)
    return open(path, "a", encoding="utf-8")
