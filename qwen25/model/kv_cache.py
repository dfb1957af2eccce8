"""A preallocated key/value cache with one length per row.

Shapes: per layer `k[layer]`, `v[layer]` are [B, n_kv_heads, max_seq_len, head_dim] in the
compute dtype (GQA-aware: only the KV heads are stored). Row b holds `lengths[b]` valid
slots; a forward over T new tokens writes them at slots lengths[b] .. lengths[b] + T - 1 and
then advances every row by T. Rows are independent, which is what continuous batching needs;
a ragged prefill can right-pad and then `set_length` each row to its real prompt length
(the padded slots are masked out and later overwritten).

The model talks to a cache through three calls, so another cache (paged, quantized) only has
to provide the same: `begin(T) -> (mask, positions)`, `update(layer, k, v) -> (k_all, v_all)`,
`end()`.
"""

from __future__ import annotations

import torch

from qwen25.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self._pending: tuple[int, int | None, int] | None = None  # (T, common start or None, kv_len)
        self._slots: torch.Tensor | None = None

    # ---- the three calls the model makes ------------------------------------------

    def begin(self, num_new: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Reserve `num_new` slots per row; return (mask, positions [B, T]).

        mask is a bool [B, 1, T, kv_len] (True = may attend) or None, meaning plain causal
        attention over the new tokens with every cached slot visible.
        """
        lengths = self.lengths
        lo, hi = int(lengths.min()), int(lengths.max())
        kv_len = hi + num_new
        if kv_len > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: {hi} cached + {num_new} new tokens > max_seq_len="
                f"{self.max_seq_len}; create the cache (or engine) with a larger max_seq_len"
            )
        steps = torch.arange(num_new, device=lengths.device)
        positions = lengths[:, None] + steps  # [B, T]
        self._slots = positions
        common = lo if lo == hi else None
        self._pending = (num_new, common, kv_len)
        if common == 0 or (common is not None and num_new == 1):
            # Causal over the new tokens and everything cached: SDPA's own causal path (or
            # no mask at all for a single query) is faster than an explicit mask.
            mask = None
        else:
            keys = torch.arange(kv_len, device=lengths.device)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, S]
        return mask, positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, n_kv, T, d] for `layer`; return the first kv_len slots of the layer."""
        assert self._pending is not None, "KVCache.update called outside begin()/end()"
        num_new, common, kv_len = self._pending
        kc, vc = self.k[layer], self.v[layer]
        if common is not None:
            kc[:, :, common:common + num_new] = k
            vc[:, :, common:common + num_new] = v
        else:
            rows = torch.arange(self.batch_size, device=k.device)[:, None]  # [B, 1]
            kc[rows, :, self._slots] = k.transpose(1, 2)  # indexed view is [B, T, n_kv, d]
            vc[rows, :, self._slots] = v.transpose(1, 2)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def end(self) -> None:
        num_new = self._pending[0] if self._pending else 0
        self.lengths += num_new
        self._pending, self._slots = None, None

    # ---- bookkeeping for the engine -----------------------------------------------

    def set_length(self, row: int, length: int) -> None:
        """Declare that row `row` holds `length` valid slots (e.g. after a padded prefill)."""
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"length {length} outside [0, {self.max_seq_len}]")
        self.lengths[row] = length

    def reset(self) -> None:
        self.lengths.zero_()
