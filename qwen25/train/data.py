"""Token batches for training: the one loader protocol the trainers use, and its seam.

A loader yields dicts of [B, T] tensors, `input_ids`, `labels` (the next token, -100 where
there is none) and `position_ids`, and has `state_dict()` / `load_state_dict()` such that a
loader restored from a state yields exactly the batches the original would have yielded
next. `qwen25.data.loader.PackedLoader` is the implementation; `open_loader` is the only
place the trainer constructs one, so tests and other sources plug in through a factory with
the same signature.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from qwen25.train.parallel import World

Batch = dict[str, torch.Tensor]


class TokenBatches(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LoaderFactory(Protocol):
    """How the trainer opens token batches (`open_loader`, or a test double)."""

    def __call__(self, manifest: str, *, split: str, seq_len: int, batch_size: int, world: World,
                 seed: int, shuffle: bool, mix: dict[str, float] | None = None,
                 sources: Sequence[str] | None = None, epochs: int | None = None,
                 reset_position_ids: bool = False) -> TokenBatches: ...


def open_loader(manifest: str, *, split: str, seq_len: int, batch_size: int, world: World, seed: int,
                shuffle: bool, mix: dict[str, float] | None = None, sources: Sequence[str] | None = None,
                epochs: int | None = None, reset_position_ids: bool = False) -> TokenBatches:
    """A `PackedLoader` over one manifest's `split`: this rank's share of every global batch.

    mix: domain weights drawn per batch slot (None: the manifest's natural mixture);
    sources: restrict to these sources (held-out sets per source); epochs: None is endless.
    The loader exposes `bytes_per_token` of its selection (for bits per byte).
    """
    from qwen25.data.loader import PackedLoader

    return PackedLoader(manifest, seq_len, batch_size, rank=world.rank, world_size=world.world_size,
                        seed=seed, shuffle=shuffle, reset_position_ids=reset_position_ids, mix=mix,
                        split=split, sources=list(sources) if sources else None, epochs=epochs)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def split_length_mix(micro_batches: Sequence[Batch], short_fraction: float, short_len: int) -> list[Batch]:
    """Cut the first round(short_fraction x rows) sequences of a step into `short_len` pieces.

    Qwen2.5-Turbo's long-context stages train on 40% sequences of the stage's full length
    and 60% shorter ones. Cutting packed rows keeps the token count (and so the loss
    normalisation and the data position) unchanged: a [k, T] slice becomes [k T/s, s] with
    positions restarting at 0 in each piece. Rows are counted over the whole step, so the
    share is right even with one sequence per micro-batch.
    """
    if short_fraction <= 0:
        return list(micro_batches)
    total_rows = sum(b["input_ids"].shape[0] for b in micro_batches)
    remaining = round(short_fraction * total_rows)
    out: list[Batch] = []
    for b in micro_batches:
        B, T = b["input_ids"].shape
        k = min(remaining, B)
        remaining -= k
        if k:
            short = {name: t[:k].reshape(k * T // short_len, short_len) for name, t in b.items()}
            short["position_ids"] = torch.arange(short_len, device=b["input_ids"].device).expand_as(
                short["input_ids"])
            out.append(short)
        if k < B:
            out.append({name: t[k:] for name, t in b.items()})
    return out
