"""The data card: `card.md` plus PNG charts, written next to the manifest.

It answers what a reader of a dataset asks first: what went in (sources, bytes, checksums),
what came out (tokens per split, domain and source; bytes per token), what was dropped and
why (per reason and per source), what the mixture is against its target, and how long the
documents are. Everything is read from the manifest, so `card.md` can be rebuilt from it
(`write_card(folder, load_manifest(folder))`).

Charts (matplotlib, Agg backend, no display needed): `card_mixture.png` (share of tokens per
domain: before mixing, target, achieved), `card_drops.png` (documents dropped per reason),
`card_lengths.png` (document length histogram in tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plots(folder: Path, m: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    mix = m["mix"]
    domains = sorted(set(mix["before"]) | set(mix["achieved"]))
    if domains:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = np.arange(len(domains))
        series = [("before mixing", mix["before"]), ("achieved", mix["achieved"])]
        if mix["target"]:
            series.insert(1, ("target", mix["target"]))
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [values.get(d, 0.0) for d in domains], width, label=label)
        ax.set_xticks(x, domains)
        ax.set_ylabel("share of training tokens")
        ax.set_title("tokens per domain")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "card_mixture.png", dpi=100)
        plt.close(fig)
        written.append("card_mixture.png")
    drops = m["counts"]["drops"]
    if drops:
        reasons = sorted(drops, key=lambda r: drops[r])
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(reasons) + 1.2))
        bars = ax.barh(reasons, [drops[r] for r in reasons])
        ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_xscale("log")  # rare reasons stay visible next to common ones
        ax.set_xlabel("documents")
        ax.set_title("documents dropped, by reason")
        fig.tight_layout()
        fig.savefig(folder / "card_drops.png", dpi=100)
        plt.close(fig)
        written.append("card_drops.png")
    counts, edges = m["lengths"]["counts"], m["lengths"]["edges"]
    if any(counts):
        first = min(i for i, c in enumerate(counts) if c)
        last = max(i for i, c in enumerate(counts) if c) + 1
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{edges[i]}-{edges[i + 1] - 1}" for i in range(first, last)]
        ax.bar(labels, counts[first:last])
        ax.set_yscale("log")  # a few long documents next to many short ones
        ax.set_xlabel("document length (tokens, incl. EOS)")
        ax.set_ylabel("documents")
        ax.set_title("document lengths (kept documents, before mixing)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        fig.tight_layout()
        fig.savefig(folder / "card_lengths.png", dpi=100)
        plt.close(fig)
        written.append("card_lengths.png")
    return written


def _table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render(m: dict[str, Any], images: list[str]) -> str:
    """The card's markdown for manifest `m`."""
    src = m["counts"]["sources"]
    parts = [f"# Data card\n\nCreated {m['created']} by `qwen25 data prepare` in {m['timing']['seconds']:.1f} s "
             f"({m['timing']['input_mb_per_s']:.2f} MB/s of input). Tokenizer `{m['tokenizer']['spec']}` "
             f"(EOS id {m['eos_token_id']}); shards are uint32 with EOS after every document."]
    parts.append("## Sources\n\n" + _table(
        ["source", "files", "input bytes", "documents in", "kept", "dropped", "sha256 (inputs)"],
        [[s, m["inputs"][s]["files"], m["inputs"][s]["bytes"], c["docs_in"], c["kept"], sum(c["drops"].values()),
          m["inputs"][s]["sha256"][:16] + "…"] for s, c in src.items() if s in m["inputs"]]))
    rows = []
    for split, info in m["splits"].items():
        for d, c in info["domains"].items():
            bpt = c["bytes"] / c["tokens"] if c["tokens"] else 0.0
            rows.append([split, d, c["docs"], c["tokens"], c["bytes"], bpt])
        rows.append([split, "**all**", info["docs"], info["tokens"], info["bytes"], info["bytes_per_token"] or 0.0])
    parts.append("## Output\n\nTraining counts include repeats from mixing. Bits per byte = loss (nats/token) "
                 "/ (bytes per token × ln 2).\n\n" + _table(
                     ["split", "domain", "documents", "tokens", "bytes", "bytes/token"], rows))
    mix = m["mix"]
    parts.append("## Mixture\n\n" + ("Target: natural (no reweighting).\n\n" if not mix["target"] else "") + _table(
        ["domain", "tokens before", "share before", "target", "rate", "tokens after", "achieved"],
        [[d, mix["tokens_before"].get(d, 0), mix["before"].get(d, 0.0),
          (mix["target"] or {}).get(d, "natural"), mix["rates"].get(d, 0.0),
          mix["tokens_after"].get(d, 0), mix["achieved"].get(d, 0.0)] for d in sorted(mix["before"])]))
    drops = m["counts"]["drops"]
    reasons = sorted(drops, key=lambda r: -drops[r])
    parts.append("## Dropped documents\n\nEvery input document is in the output or counted here "
                 f"(listing: `{m['listings']['drops']}`; "
                 f"eval-set overlaps: `{m['listings']['decontam']}`).\n\n" + _table(
                     ["reason", "total", *src.keys()],
                     [[r, drops[r], *[c["drops"].get(r, 0) for c in src.values()]] for r in reasons]))
    if m.get("quality"):
        q = m["quality"]
        parts.append(f"## Model-based scores ({q['scorer']}, `{q['model']}`)\n\n" + _table(
            ["source", "scored", "mean", "min", "max"],
            [[s, v["scored"], v["mean"], v["min"], v["max"]] for s, v in q["sources"].items()]))
    parts.append("## Charts\n\n" + "\n\n".join(f"![{p}]({p})" for p in images))
    return "\n\n".join(parts) + "\n"


def write_card(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `card.md` and its PNG charts into `folder`; returns the markdown's path."""
    folder = Path(folder)
    images = _plots(folder, manifest)
    path = folder / "card.md"
    path.write_text(render(manifest, images), encoding="utf-8")
    return path
