"""The KV cache: a fixed number of slots (rows), each holding one sequence at its own length.

Storage is allocated once, in the compute dtype, with only the KV heads (GQA):
`k[layer]`, `v[layer]` are [slots, n_kv_heads, max_seq_len, head_dim]; `lengths[slot]` counts
the valid positions of the sequence in that slot. The PyTorch model, the engine's scheduler
and the C++ decoder (`qwen25.engine.fast`) all read and write these same tensors.

The model talks to a cache through three calls, so another cache (paged, quantized) only has
to provide the same protocol:

    mask, positions = cache.begin(T)    # reserve T new positions per row
    k_all, v_all = cache.update(layer, k, v)   # per layer: store the new K/V, get the prefix
    cache.end()                         # advance the lengths

`KVCache` itself speaks it over all of its slots (a plain batched prefill + decode loop);
`cache.rows(slots)` speaks it over a *subset* of slots in a chosen order, which is what
continuous batching needs: prefill one new request while others decode, decode only the busy
slots, each at its own length. One mask rule serves both: the query at absolute position p
sees key s iff s <= p, which also hides stale entries between a shorter row's length and the
longest row's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen25.config import ModelConfig


class KVCache:
    """`slots` sequences of up to `max_seq_len` positions each (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, slots: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        shape = (slots, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        # zeros, not empty: stale slots are masked out, but NaN garbage times a zero weight
        # would still poison the attention output.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.lengths = [0] * slots
        self.slots, self.max_seq_len = slots, max_seq_len
        self._all: RowsView | None = None  # the view of a forward over every slot

    @property
    def batch_size(self) -> int:
        return self.slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # ---- the model's protocol over every slot ----------------------------------------

    def begin(self, num_new: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Reserve num_new positions in every slot -> (bool mask [B, 1, T, S] or None, positions [B, T])."""
        self._all = self.rows(range(self.slots))
        return self._all.begin(num_new)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._all is not None, "KVCache.update called outside begin()/end()"
        return self._all.update(layer, k, v)

    def end(self) -> None:
        if self._all is not None:
            self._all.end()
        self._all = None

    # ---- bookkeeping (the engine's scheduler, ragged prefills) --------------------------

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

    def copy_from(self, src: KVCache, dst: int, src_slot: int = 0) -> None:
        """Give slot `dst` the cached positions of `src`'s slot (another cache of the same
        model): a prefix computed once, reused by every prompt that starts with it."""
        n = src.lengths[src_slot]
        if n > self.max_seq_len:
            raise ValueError(f"a cached prefix of {n} positions does not fit max_seq_len={self.max_seq_len}")
        for mine, theirs in ((self.k, src.k), (self.v, src.v)):
            for t, u in zip(mine, theirs):
                t[dst, :, :n] = u[src_slot, :, :n]
        self.lengths[dst] = n

    def set_length(self, slot: int, length: int) -> None:
        """Declare that `slot` holds `length` valid positions (e.g. after a right-padded
        prefill: the padded positions are masked out and later overwritten)."""
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"length {length} outside [0, {self.max_seq_len}]")
        self.lengths[slot] = length

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def reset(self) -> None:
        self.lengths = [0] * self.slots


class RowsView:
    """The model-facing cache protocol over some slots of a KVCache.

    Row i of the batch is slot `slots[i]`; the T new tokens of a forward land at positions
    lengths[slot] .. lengths[slot] + T - 1 of each slot, and `end()` advances the lengths.
    """

    def __init__(self, cache: KVCache, slots: list[int]):
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
            raise ValueError(f"KV cache overflow: {max(lengths)} cached + {num_new} new tokens > max_seq_len="
                             f"{self.cache.max_seq_len}; create the cache (or engine) with a larger max_seq_len")
        device = self._index.device
        start = torch.tensor(lengths, device=device)
        positions = start[:, None] + torch.arange(num_new, device=device)  # [B, T]
        self._pending = (num_new, lengths, kv_len)
        same = all(n == lengths[0] for n in lengths)
        if same and (lengths[0] == 0 or num_new == 1):
            # Causal over the new tokens and everything cached: SDPA's own causal path (or no
            # mask at all for a single query) is faster than an explicit mask.
            return None, positions
        keys = torch.arange(kv_len, device=device)
        mask = keys[None, None, :] <= positions[:, :, None]  # [B, T, S]
        return mask[:, None], positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, n_kv, T, d] of `layer`; return the first kv_len positions [B, n_kv, S, d]."""
        assert self._pending is not None, "RowsView.update called outside begin()/end()"
        num_new, lengths, kv_len = self._pending
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        if self._contiguous and all(n == lengths[0] for n in lengths):  # one slice write
            lo, hi, n = self.slots[0], self.slots[0] + len(self.slots), lengths[0]
            kc[lo:hi, :, n:n + num_new] = k
            vc[lo:hi, :, n:n + num_new] = v
        else:
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
