"""What the two pairwise stages (DPO, reward model) share around the run harness.

- `PairData`: the pairs of a jsonl file tokenised once, split into train and held-out
  indices, with the drop counts (`qwen25.data.preference.PairStats`) written to
  OUT/data_stats.json and printed as one line, so bad rows are visible, never silent.
- `micro_batches`: the step's pairs on this rank, cut into micro-batches and collated; extra
  per-pair tensors (the DPO reference log-probs) ride along in each batch.
- `StepMetrics`: the loss functions add per-pair sums (rewards, accuracy) into it; the stage
  flushes one record per optimizer step into metrics.jsonl (the harness logs the loss).
- `tokenizer_files`: the tokenizer files of a checkpoint folder, copied into every
  checkpoint so each one is a complete, loadable model folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen25.data.preference import (PairStats, PreferencePair, collate_pairs, collate_shared_prompt, load_pairs, split_heldout,
                                    step_pairs)
from qwen25.errors import UserError
from qwen25.train import parallel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def load_stage_tokenizer(model_dir: str, tokenizer: str | None):
    from qwen25.tokenizer import load_tokenizer

    try:
        return load_tokenizer(tokenizer or model_dir)
    except UserError as e:
        if tokenizer:
            raise
        raise UserError(f"{e} (a folder without tokenizer files can use --tokenizer qwen2.5)") from None


def tokenizer_files(tok_dir: str | None) -> list[Path]:
    if tok_dir is None or not Path(tok_dir).is_dir():
        return []
    return [Path(tok_dir) / f for f in TOKENIZER_FILES if (Path(tok_dir) / f).exists()]


@dataclass
class PairData:
    pairs: list[PreferencePair]
    train: list[int]
    heldout: list[int]
    stats: PairStats

    @classmethod
    def load(cls, path: str, tokenizer, *, max_length: int, vocab_size: int, eval_fraction: float,
             seed: int) -> PairData:
        pairs, stats = load_pairs(path, tokenizer, max_length=max_length, vocab_size=vocab_size)
        train, heldout = split_heldout(len(pairs), eval_fraction, seed)
        return cls(pairs, train, heldout, stats)

    def report(self, out: Path, world: parallel.World, write: Callable[[str], None]) -> None:
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "data_stats.json").write_text(json.dumps(self.stats.as_dict() | {
                "train": len(self.train), "heldout": len(self.heldout)}, indent=1))
        write(f"data: {self.stats.summary()}; {len(self.train)} train, {len(self.heldout)} held out")
        for reason, where in self.stats.examples.items():
            write(f"  first {reason}: {where}")


def collate(pairs: list[PreferencePair], indices: list[int], pad_id: int,
            extra: dict[str, torch.Tensor] | None = None, shared_prompt: bool = False) -> dict[str, torch.Tensor]:
    """`collate_pairs` of pairs[indices] (or `collate_shared_prompt`), plus extra[k][indices]
    for each per-pair tensor."""
    chosen = [pairs[i] for i in indices]
    batch = collate_shared_prompt(chosen, pad_id) if shared_prompt else collate_pairs(chosen, pad_id)
    idx = torch.tensor(indices, dtype=torch.long)
    for k, v in (extra or {}).items():
        batch[k] = v[idx]
    batch["pair_index"] = idx
    return batch


def micro_batches(data: PairData, step: int, *, batch_size: int, micro_batch: int, seed: int,
                  world: parallel.World, pad_id: int,
                  extra: dict[str, torch.Tensor] | None = None,
                  shared_prompt: bool = False) -> list[dict[str, torch.Tensor]]:
    """This rank's share of global step `step`, in collated micro-batches on its device."""
    mine = step_pairs(data.train, step, batch_size, seed, world.rank, world.world_size)
    out = []
    for start in range(0, len(mine), micro_batch):
        b = collate(data.pairs, mine[start:start + micro_batch], pad_id, extra, shared_prompt)
        out.append({k: v.to(world.device) for k, v in b.items()})
    return out


def heldout_batches(data: PairData, micro_batch: int, world: parallel.World, pad_id: int,
                    extra: dict[str, torch.Tensor] | None = None, shared_prompt: bool = False):
    """The held-out pairs of this rank (rank r takes every world_size-th), collated."""
    mine = data.heldout[world.rank::world.world_size]
    for start in range(0, len(mine), micro_batch):
        b = collate(data.pairs, mine[start:start + micro_batch], pad_id, extra, shared_prompt)
        yield {k: v.to(world.device) for k, v in b.items()}


class StepMetrics:
    """Per-pair sums of one optimizer step (all micro-batches), reduced over ranks on flush."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.pairs = 0

    def add(self, sums: dict[str, torch.Tensor], pairs: int) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
        self.pairs += pairs

    def means(self, world: parallel.World) -> dict[str, float]:
        """Means per pair over this step on all ranks; resets the sums."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        device = world.device
        t = torch.stack([self.sums[k].to(device) for k in keys] + [torch.tensor(float(self.pairs), device=device,
                                                                                 dtype=torch.float64)])
        parallel.all_reduce_sum(t, world)
        n = max(float(t[-1]), 1.0)
        self.sums, self.pairs = {}, 0
        return {k: float(v) / n for k, v in zip(keys, t[:-1])}


def plot_pair_metrics(metrics_path: Path, out_dir: Path) -> Path | None:
    """plots/pairs.png: every per-pair metric of the "pairs" records (train) and of the
    held-out "eval" records against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qwen25.train.metrics import read_metrics

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "pairs"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("split") == "pairs"]
    keys = sorted({k for r in train for k in r if "/" in k})
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=0.8, label="train")
        pts = [r for r in evals if key in r]
        if pts:
            ax.plot([r["step"] for r in pts], [r[key] for r in pts], marker="o", ms=3, label="held-out")
        ax.set(ylabel=key)
        ax.legend(fontsize=7)
    axes[-1, 0].set(xlabel="step")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pairs.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
