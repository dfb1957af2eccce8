"""Run metrics: one JSON object per line in `metrics.jsonl`, and PNG curves drawn from it.

Records carry a `kind`: "train" (one per optimizer step: step, loss, lr, tokens, grad_norm,
tokens_per_s, mfu, skipped), "eval" (step, split, loss, bpb), "sample" (step, prompt,
text). On resume the file is cut back to the checkpoint's step first, so a replayed step is
never logged twice and the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL writer (rank 0 only; other ranks get a disabled instance)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (what an interrupted run logged past its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records (a line cut short by a kill is ignored)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw loss.png (train + eval loss vs tokens), bpb.png, lr.png, throughput.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if not train:
        return written

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7,
            label="train")
    for split in sorted({r["split"] for r in evals}):
        pts = [r for r in evals if r["split"] == split]
        ax.plot([r["tokens"] / 1e6 for r in pts], [r["loss"] for r in pts], marker="o", ms=3,
                label=f"held-out: {split}")
    _stage_lines(ax, train)
    ax.set(xlabel="tokens (M)", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    save(fig, "loss.png")

    if any(r.get("bpb") is not None for r in evals):
        fig, ax = plt.subplots(figsize=(7, 4))
        for split in sorted({r["split"] for r in evals}):
            pts = [r for r in evals if r["split"] == split and r.get("bpb") is not None]
            if pts:
                ax.plot([r["tokens"] / 1e6 for r in pts], [r["bpb"] for r in pts], marker="o", ms=3,
                        label=split)
        _stage_lines(ax, train)
        ax.set(xlabel="tokens (M)", ylabel="bits per byte", title="held-out bits per byte")
        ax.legend()
        save(fig, "bpb.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r.get("tokens_per_s") or 0 for r in train])
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    save(fig, "throughput.png")
    return written


def _stage_lines(ax, train: list[dict]) -> None:
    """Dashed vertical lines where a new stage (e.g. long context) begins."""
    prev = None
    for r in train:
        if prev is not None and r.get("stage") != prev:
            ax.axvline(r["tokens"] / 1e6, color="grey", ls="--", lw=0.8)
            ax.text(r["tokens"] / 1e6, ax.get_ylim()[1], f" {r.get('stage')}", va="top", fontsize=8)
        prev = r.get("stage")
