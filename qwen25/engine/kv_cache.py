"""The engine's KV cache: a fixed number of slots, each holding one sequence.

Storage is allocated once, in the compute dtype, with only the KV heads (GQA):
`k[layer]`, `v[layer]` are [slots, n_kv_heads, max_seq_len, head_dim], the layout of
`qwen25.model.kv_cache.KVCache`, so the PyTorch model and the C++ decoder read the same
tensors. `lengths[slot]` counts the valid positions of the sequence in that slot.

Continuous batching needs what the model's cache does not offer: running the model over a
*subset* of slots, each at its own length (prefill one new request while others decode,
decode only the busy slots). `rows(slots)` returns such a view, which speaks the model's
cache protocol (`begin(T) -> (mask, positions)`, `update(layer, k, v)`, `end()`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen25.config import ModelConfig


class SlotCache:
    def __init__(self, cfg: ModelConfig, slots: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (slots, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        # zeros, not empty: stale slots are masked out, but NaN garbage times a zero weight
        # would still poison the attention output.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.lengths = [0] * slots
        self.slots, self.max_seq_len = slots, max_seq_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, slots: Sequence[int]) -> RowsView:
        """A view over `slots` (in this order) for one forward of the model."""
        return RowsView(self, list(slots))

    def copy_slot(self, src: int, dst: int) -> None:
        """Give slot `dst` the same cached prefix as `src` (n samples share one prefill)."""
        n = self.lengths[src]
        for kv in (self.k, self.v):
            for t in kv:
                t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0


class RowsView:
    """The model-facing cache protocol over some slots of a SlotCache.

    Row i of the batch is slot `slots[i]`; the T new tokens of a forward land at positions
    lengths[slot] .. lengths[slot] + T - 1 of each slot, and `end()` advances the lengths.
    """

    def __init__(self, cache: SlotCache, slots: list[int]):
        self.cache, self.slots = cache, slots
        lo = slots[0]
        self._contiguous = slots == list(range(lo, lo + len(slots)))
        self._index = torch.tensor(slots, device=cache.k[0].device)
        self._pending: tuple[int, list[int], int] | None = None

    def begin(self, num_new: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Reserve num_new positions per row -> (bool mask [B, 1, T, S] or None, positions [B, T])."""
        lengths = [self.cache.lengths[s] for s in self.slots]
        kv_len = max(lengths) + num_new
        if kv_len > self.cache.max_seq_len:
            raise ValueError(f"KV cache overflow: {kv_len} positions > max_seq_len={self.cache.max_seq_len}")
        device = self._index.device
        start = torch.tensor(lengths, device=device)
        positions = start[:, None] + torch.arange(num_new, device=device)  # [B, T]
        self._pending = (num_new, lengths, kv_len)
        same = all(n == lengths[0] for n in lengths)
        if same and (lengths[0] == 0 or num_new == 1):
            return None, positions  # plain causal (or one query that sees every key)
        keys = torch.arange(kv_len, device=device)
        # key s is visible to the query at position p iff s <= p: this also hides the stale
        # slots between a shorter row's length and kv_len.
        mask = keys[None, None, :] <= positions[:, :, None]  # [B, T, S]
        return mask[:, None], positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, n_kv, T, d] of `layer`; return the first kv_len positions [B, n_kv, S, d]."""
        assert self._pending is not None, "RowsView.update called outside begin()/end()"
        num_new, lengths, kv_len = self._pending
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        for i, (slot, n) in enumerate(zip(self.slots, lengths)):
            kc[slot, :, n:n + num_new] = k[i]
            vc[slot, :, n:n + num_new] = v[i]
        if self._contiguous:
            lo = self.slots[0]
            hi = lo + len(self.slots)
            return kc[lo:hi, :, :kv_len], vc[lo:hi, :, :kv_len]
        return kc[self._index, :, :kv_len], vc[self._index, :, :kv_len]

    def end(self) -> None:
        num_new = self._pending[0] if self._pending else 0
        for slot in self.slots:
            self.cache.lengths[slot] += num_new
        self._pending = None
