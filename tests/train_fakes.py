"""A small in-repo token source behind the trainer's loader protocol, for trainer tests.

`ArrayLoader` packs a 1-D token array into fixed-length sequences, shuffles them per epoch
with a seed, gives each rank its slice of every global batch, and checkpoints
(epoch, cursor). A "manifest" here is a JSON file naming a `.npy` token array per split.
The real loader (`qwen25.data.loader.PackedLoader`) has the same interface.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


class ArrayLoader:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, bytes_per_token: float = 1.0,
                 epochs: int | None = None):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.n_seq = (len(tokens) - 1) // seq_len
        # Like PackedLoader: a finite pass over too little data yields no batch; an endless one
        # (training) must have a batch to repeat.
        assert epochs is not None or self.n_seq >= batch_size * world_size, "corpus too small for one global batch"
        self.epoch, self.cursor = 0, 0
        self.bytes_per_token, self.epochs = bytes_per_token, epochs

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_seq)
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(self.n_seq, generator=g)

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order()
            per_step = self.batch_size * self.world_size
            while self.cursor + per_step <= self.n_seq:
                idx = order[self.cursor + self.rank * self.batch_size:][:self.batch_size]
                self.cursor += per_step
                starts = idx * self.seq_len
                rows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
                B, T = rows.shape[0], self.seq_len
                yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:].clone(),
                       "position_ids": torch.arange(T).expand(B, T)}
            self.epoch, self.cursor = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def write_fake_manifest(folder: Path, train: np.ndarray, val: np.ndarray, bytes_per_token: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train.npy", train.astype(np.uint32))
    np.save(folder / "val.npy", val.astype(np.uint32))
    path = folder / "manifest.json"
    path.write_text(json.dumps({"train": "train.npy", "val": "val.npy", "bytes_per_token": bytes_per_token}))
    return path


def fake_factory(manifest, *, split, seq_len, batch_size, world, seed, shuffle, mix=None, sources=None,
                 epochs=None, reset_position_ids=False):
    """The trainer's `LoaderFactory` signature over a fake manifest (`mix`/`sources` unsupported)."""
    assert mix is None and sources is None and not reset_position_ids
    meta = json.loads(Path(manifest).read_text())
    tokens = np.load(Path(manifest).parent / meta[split])
    return ArrayLoader(tokens, seq_len, batch_size, world.rank, world.world_size, seed, shuffle,
                       meta["bytes_per_token"], epochs)


def main(config_json: str) -> None:
    """Run `pretrain` on the fake data with the PretrainConfig in `config_json` (a subprocess entry)."""
    from qwen25.cli.config_args import config_from_dict
    from qwen25.train.config import PretrainConfig
    from qwen25.train.pretrain import pretrain

    cfg = config_from_dict(PretrainConfig, json.loads(Path(config_json).read_text()))
    pretrain(cfg, loader_factory=fake_factory)


if __name__ == "__main__":
    main(sys.argv[1])
