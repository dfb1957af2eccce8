"""SFT batches: the same conversations per step, laid out padded, packed or padding-free.

A step is `batch_size` conversations (all ranks together), taken in a seeded order that is
reshuffled every epoch; rank r takes its contiguous share. Within a rank they are laid out
in one of three ways, all giving the same summed loss and target count, hence the same
step as one conversation per row:

- "pad": `micro_batch` conversations per micro-batch, right-padded to the longest one
  (`attention_mask` 1/0, labels -100 on padding).
- "pack": conversations placed in order into rows of at most `seq_len` tokens (a new row
  when the next one does not fit), `micro_batch` rows per micro-batch. Positions restart at
  0 for each conversation and the attention mask is block-diagonal causal, so no token sees
  another conversation (`attention_mask` [B, 1, T, T] bool, see `Transformer.forward`).
- "padding_free": like "pack" with one row per micro-batch of up to `micro_batch x seq_len`
  tokens: no padding at all.

Batches are dicts of tensors: input_ids, labels, position_ids [B, T], attention_mask. The
loader's state is (epoch, step): restored, it yields exactly the batches the original
would have yielded next (what exact resume needs). Steps per epoch drop the remainder of
`len(examples) // batch_size` (each epoch drops different examples, its order is new).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from qwen25.data.chat import IGNORE_INDEX, Example
from qwen25.errors import UserError

LAYOUTS = ("pad", "pack", "padding_free")
Batch = dict[str, torch.Tensor]


def pad_batch(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """One conversation per row, right-padded to the longest."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    am = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.ids)
        labels[i, :n] = torch.tensor(e.labels)
        am[i, :n] = 1
    positions = (am.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": am}


def pack_rows(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """Examples in order into rows of at most seq_len tokens (next-fit: order is kept)."""
    rows: list[list[Example]] = []
    used = seq_len + 1
    for e in examples:
        if len(e) > seq_len:
            raise UserError(f"{e.where}: {len(e)} tokens do not fit a row of {seq_len}")
        if used + len(e) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], pad_id: int = 0) -> Batch:
    """Rows of several conversations: positions restart, attention block-diagonal causal."""
    T = max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # which conversation; -1 padding
    for b, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row):
            n = len(e)
            ids[b, at:at + n] = torch.tensor(e.ids)
            labels[b, at:at + n] = torch.tensor(e.labels)
            positions[b, at:at + n] = torch.arange(n)
            segment[b, at:at + n] = k
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "attention_mask": segment_mask(segment)}


def segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: query t sees key s <= t of the same segment; padding sees itself."""
    T = segment.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    mask = causal & same & (segment[:, None, :] >= 0)
    mask |= torch.eye(T, dtype=torch.bool) & (segment[:, :, None] < 0)  # keep softmax finite
    return mask.unsqueeze(1)


def layout(examples: Sequence[Example], how: str, micro_batch: int, seq_len: int, pad_id: int = 0) -> list[Batch]:
    """One rank's conversations of a step as micro-batches in layout `how`."""
    if how == "pad":
        return [pad_batch(examples[i:i + micro_batch], pad_id) for i in range(0, len(examples), micro_batch)]
    if how == "pack":
        rows = pack_rows(examples, seq_len)
        return [packed_batch(rows[i:i + micro_batch], pad_id) for i in range(0, len(rows), micro_batch)]
    if how == "padding_free":
        return [packed_batch([row], pad_id) for row in pack_rows(examples, seq_len * micro_batch)]
    raise UserError(f"layout={how!r}: use one of {', '.join(LAYOUTS)}")


def empty_batch(pad_id: int = 0) -> Batch:
    """A one-token micro-batch without targets: what a rank with fewer micro-batches runs so
    every rank makes the same number of (collective) forward passes. Loss 0, count 0."""
    return {"input_ids": torch.full((1, 1), pad_id, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((1, 1), dtype=torch.long),
            "attention_mask": torch.ones((1, 1), dtype=torch.long)}


class ChatBatches:
    """Endless (or `epochs`-long) steps over `examples`; see the module docstring."""

    def __init__(self, examples: Sequence[Example], *, batch_size: int, micro_batch: int, seq_len: int,
                 layout: str = "pack", rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, epochs: int | None = None, pad_id: int = 0):
        if layout not in LAYOUTS:
            raise UserError(f"layout={layout!r}: use one of {', '.join(LAYOUTS)}")
        if batch_size % world_size:
            raise UserError(f"batch_size={batch_size} conversations is not divisible by {world_size} ranks")
        if len(examples) < batch_size:
            raise UserError(f"{len(examples)} examples are fewer than one batch of {batch_size}; "
                            "lower --batch-size or give more data")
        self.examples, self.batch_size, self.micro_batch, self.seq_len = list(examples), batch_size, micro_batch, seq_len
        self.layout, self.rank, self.world_size = layout, rank, world_size
        self.seed, self.shuffle, self.epochs, self.pad_id = seed, shuffle, epochs, pad_id
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"sft:{self.seed}:{epoch}").shuffle(order)
        return order

    def step_examples(self) -> list[Example]:
        """This rank's conversations of the next step (advances the position)."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        order = self._order(self.epoch)
        share = self.batch_size // self.world_size
        start = self.step * self.batch_size + self.rank * share
        self.step += 1
        return [self.examples[i] for i in order[start:start + share]]

    def __iter__(self) -> Iterator[list[Batch]]:
        """Each item: this rank's micro-batches of one step."""
        while True:
            try:
                examples = self.step_examples()
            except StopIteration:
                return
            yield layout(examples, self.layout, self.micro_batch, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
