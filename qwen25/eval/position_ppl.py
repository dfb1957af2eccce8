"""Perplexity against position: does the loss stay flat past the trained context?

A model that handles a long context predicts token t at least as well as token t/2 (more
context can only help); one that breaks past its trained length shows the loss rising from
there. We run held-out sequences through a KV cache in chunks (prefill memory grows with
the chunk, and only `chunk x vocab` logits exist at a time, so 32K-token sequences of a
151,936-token vocabulary fit), and average the next-token loss over position bins.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qwen25.errors import UserError
from qwen25.files import atomic_write
from qwen25.model.logprobs import token_logprobs
from qwen25.model.kv_cache import KVCache


@torch.inference_mode()
def position_nll(model, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Next-token loss (nats, float32) of every position: ids [B, N] -> [B, N - 1].

    Entry t is -log p(ids[:, t + 1] | ids[:, :t + 1]). The sequence is fed `chunk` tokens
    at a time through a KVCache, exactly as a chunked prefill does.
    """
    B, N = ids.shape
    if N < 2:
        raise UserError("position_nll needs sequences of at least 2 tokens")
    cache = KVCache(model.config, B, N, dtype=model.dtype, device=model.device)
    ids = ids.to(model.device)
    out = []
    for a in range(0, N - 1, chunk):
        b = min(a + chunk, N - 1)  # positions a..b-1 predict a+1..b; the last token predicts nothing
        h, _ = model.hidden_states(ids[:, a:b], kv_cache=cache)
        logits = model.lm_head(h)  # [B, b - a, vocab]
        out.append(-token_logprobs(logits, ids[:, a + 1:b + 1], 1.0))
    return torch.cat(out, dim=1).cpu()


def bin_edges(length: int, bins: int) -> list[int]:
    """`bins` position ranges [edge_i, edge_i+1) covering 0..length-1 (predicting positions)."""
    bins = max(1, min(bins, length))
    return [round(i * length / bins) for i in range(bins + 1)]


def nll_by_position(model, sequences: Sequence[Sequence[int]], bins: int = 16, chunk: int = 512,
                    batch_size: int = 1, progress: bool = True) -> list[dict]:
    """Mean loss and perplexity per position bin over equal-length `sequences`.

    Returns one dict per bin: {"start", "end" (exclusive, positions of the predicting
    token), "nll" (nats), "ppl", "tokens"}.
    """
    from tqdm import tqdm

    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise UserError("nll_by_position needs sequences of one length")
    n = lengths.pop() - 1
    total = torch.zeros(n, dtype=torch.float64)
    rows = 0
    for i in tqdm(range(0, len(sequences), batch_size), desc="ppl", unit="batch", disable=not progress):
        batch = torch.tensor([list(s) for s in sequences[i:i + batch_size]], dtype=torch.long)
        total += position_nll(model, batch, chunk).double().sum(0)
        rows += batch.shape[0]
    edges = bin_edges(n, bins)
    out = []
    for lo, hi in zip(edges, edges[1:]):
        nll = float(total[lo:hi].sum() / (rows * (hi - lo)))
        out.append({"start": lo, "end": hi, "nll": nll, "ppl": math.exp(min(nll, 50.0)),
                    "tokens": rows * (hi - lo)})
    return out


def held_out_sequences(pool, length: int, count: int, seed: int = 0) -> list[list[int]]:
    """`count` windows of `length` tokens from a FillerPool (seeded offsets)."""
    rng = random.Random(f"ppl:{seed}:{length}")
    return [pool.window(length, rng) for _ in range(count)]


def markdown_bins(curves: dict[str, list[dict]], title: str) -> str:
    """Position bins as rows, one loss column (nats) per curve."""
    names = list(curves)
    first = curves[names[0]]
    lines = [f"**{title}**", "", "| positions | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for i, b in enumerate(first):
        cells = [f"{curves[k][i]['nll']:.3f}" for k in names]
        lines.append(f"| {b['start']}-{b['end'] - 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bins(curves: dict[str, list[dict]], path, title: str, trained: int | None = None) -> None:
    """PNG: loss against position, one line per curve; a dashed line at the trained length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, bins in curves.items():
        ax.plot([(b["start"] + b["end"]) / 2 for b in bins], [b["nll"] for b in bins], marker="o",
                markersize=3, label=name)
    if trained:
        ax.axvline(trained, color="grey", linestyle="--", linewidth=1, label="trained length")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# `qwen25 eval ppl`
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PplConfig:
    """`qwen25 eval ppl`: loss against position on held-out text."""

    length: int = 32768  # tokens per held-out sequence
    sequences: int = 4  # sequences averaged (windows of the text at seeded offsets)
    bins: int = 16  # position bins of the table and the plot
    text: str = "shakespeare"  # shakespeare, milton, generated, or a text file/folder
    chunk: int = 512  # prefill chunk: memory holds chunk x vocab float32 logits
    seed: int = 0  # picks the windows
    out: str = "runs/eval"  # folder for ppl.json, ppl.md and ppl.png

    def validate(self) -> None:
        for name in ("length", "sequences", "bins", "chunk"):
            if getattr(self, name) < (2 if name == "length" else 1):
                raise UserError(f"{name}={getattr(self, name)} is too small")


def evaluate_ppl(model, tokenizer, cfg: PplConfig, progress: bool = True) -> dict:
    """{"settings": ..., "bins": nll_by_position(...)} for `model` as configured."""
    from qwen25.eval.filler import filler_pool
    from qwen25.model.context import context_limit

    cfg.validate()
    pool = filler_pool(tokenizer, cfg.text, min_tokens=cfg.length * (cfg.sequences + 1), seed=cfg.seed)
    seqs = held_out_sequences(pool, cfg.length, cfg.sequences, cfg.seed)
    bins = nll_by_position(model, seqs, cfg.bins, cfg.chunk, progress=progress)
    settings = {**asdict(cfg), "context_limit": context_limit(model.config)}
    return {"settings": settings, "bins": bins}


def write_ppl_report(result: dict, out_dir, title: str, trained: int | None = None) -> list[Path]:
    """ppl.json, ppl.md and ppl.png in `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {"loss (nats)": result["bins"]}
    paths = []
    for name, text in (("ppl.json", json.dumps(result, indent=1)),
                       ("ppl.md", f"# loss against position: {title}\n\n"
                                  + markdown_bins(curves, "next-token loss per position bin") + "\n")):
        paths.append(atomic_write(out / name, text))
    plot_bins(curves, out / "ppl.png", title, trained)
    paths.append(out / "ppl.png")
    return paths
