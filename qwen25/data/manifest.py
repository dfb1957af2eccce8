"""`manifest.json`: the one file that describes a prepared dataset (schema version 1).

Written last by `pipeline.prepare` (temporary name, then rename), read by `PackedLoader`,
`qwen25 data stats` and the data card. Paths are relative to the manifest's folder.

{
  "format": "qwen25-shards", "version": 1, "created": ISO-8601 UTC,
  "dtype": "uint32", "eos_token_id": int (the document separator in the shards:
                                         <|endoftext|> when the vocabulary has it),
  "tokenizer": {"spec", "class", "vocab_size", "eos_token_id" (the tokenizer's own eos)},
  "config": DataConfig as plain data,
  "inputs": {source: {"path", "files", "bytes", "sha256" (over relpath + file sha256), "files_ignored"}},
  "counts": {
    "sources": {source: {"docs_in", "bytes_in", "kept", "drops": {reason: n}}},
    "drops": {reason: n},                       # all sources
    "domains": {domain: {"docs", "tokens", "bytes"}}   # kept documents before mixing
  },
  "mix": {"target": {domain: w} | null (natural), "rates": {domain: r},
          "tokens_before": {domain: t}, "tokens_after": {domain: t},
          "before": {domain: share}, "achieved": {domain: share}},
  "splits": {"train" | "val": {"docs", "tokens", "bytes", "bytes_per_token",
                               "domains": {d: {"docs", "tokens", "bytes"}},
                               "sources": {s: {"docs", "tokens", "bytes"}}}},
  "lengths": {"edges": [token counts], "counts": [documents per bin]},
  "shards": [{"path", "index", "split", "domain", "source", "tokens", "docs", "bytes", "sha256"}],
  "listings": {"drops": "drops.jsonl", "decontam": "decontam.jsonl"},
  "quality": {"scorer", "model", per source {"scored", "mean", "min", "max"}} | null,
  "timing": {"seconds", "input_mb_per_s"}
}

Token counts include the EOS after every document; "bytes" are UTF-8 bytes of the
documents' (normalised) text. Bits per byte of a split: bpb = loss_nats_per_token *
tokens / (bytes * ln 2) = loss / (bytes_per_token * ln 2). Train counts include repeats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen25.files import atomic_write, sha256_file
from qwen25.errors import UserError

FORMAT, VERSION = "qwen25-shards", 1
NAME = "manifest.json"


def manifest_path(path: str | Path) -> Path:
    """A manifest file, or the folder holding `manifest.json`."""
    p = Path(path)
    return p / NAME if p.is_dir() else p


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check a manifest (format, version, shard files present); one-line errors."""
    p = manifest_path(path)
    if not p.is_file():
        raise UserError(f"data manifest {p} not found; run `qwen25 data prepare` first or pass "
                        "the folder that holds manifest.json")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"data manifest {p} is not valid JSON ({e}); re-run `qwen25 data prepare`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else None
        raise UserError(f"{p} is not a qwen25 data manifest (format {found!r})")
    if m.get("version") != VERSION:
        raise UserError(f"data manifest {p} has version {m.get('version')}, this qwen25 reads {VERSION}; "
                        "re-run `qwen25 data prepare`")
    for shard in m["shards"]:
        if not (p.parent / shard["path"]).is_file():
            raise UserError(f"shard {shard['path']} listed in {p} is missing; re-run `qwen25 data prepare`")
    m["_root"] = str(p.parent)
    return m


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write `folder/manifest.json` atomically."""
    path = Path(folder) / NAME
    return atomic_write(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def verify(m: dict[str, Any]) -> list[str]:
    """Shards whose sha256 or size on disk differs from the manifest (empty: all good)."""
    root = Path(m["_root"])
    bad = []
    for shard in m["shards"]:
        p = root / shard["path"]
        if p.stat().st_size != 4 * shard["tokens"] or sha256_file(p) != shard["sha256"]:
            bad.append(shard["path"])
    return bad


def select_shards(m: dict[str, Any], split: str = "train", domains=None, sources=None) -> list[dict]:
    """The manifest's shard entries of one split, optionally restricted to domains / sources."""
    splits = sorted({s["split"] for s in m["shards"]})
    if split not in splits:
        raise UserError(f"split {split!r} has no shards in this manifest; splits: {splits}")
    out = [s for s in m["shards"] if s["split"] == split]
    for key, wanted in (("domain", domains), ("source", sources)):
        if wanted is not None:
            have = sorted({s[key] for s in out})
            unknown = sorted(set(wanted) - set(have))
            if unknown:
                raise UserError(f"{key}(s) {unknown} not in split {split!r}; available: {have}")
            out = [s for s in out if s[key] in set(wanted)]
    return out
