"""Dual Chunk Attention (DCA; An et al. 2024, arXiv 2402.17463), as Qwen2.5 uses it at inference.

DCA keeps every query-key distance inside the trained range by remapping RoPE positions.
With chunk_size c (about the trained context) and local_size w, the sequence is cut into
chunks of s = c - w tokens; a token at absolute position p sits in chunk n = p // s at
offset r = p % s (spec §4.2):

- every key is rotated by its offset r_k = k % s;
- a query attends to three ranges of keys, each with its own query position:
    intra      keys in chunk n (causal)        query position r            (true distances)
    successive keys in chunk n-1               query position min(r + s, c) (true up to c)
    inter      keys in chunks 0..n-2           query position min(2s - 1, c) (a constant)
- the three pieces are merged exactly by log-sum-exp weights (here: one online softmax).

If the whole sequence fits in one chunk only the intra piece exists and DCA is ordinary causal
attention. With `original_max_position_embeddings` set, logits are additionally scaled by
mscale^2, mscale = max(1, 0.1 ln(len / L_orig) + 1), the length-dependent temperature of the
Qwen2.5-1M models; len is the number of tokens the query sees (its position + 1).

Memory grows with the tile, not with the sequence squared: queries and keys are processed in
tiles, and partial softmax sums are carried from tile to tile.
"""

from __future__ import annotations

import math

import torch

from qwen25.config import DCAConfig


def key_positions(positions: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """RoPE position of each key (and of each intra-chunk query): offset inside its chunk."""
    return positions % chunk_len


def query_positions(positions: torch.Tensor, dca: DCAConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intra, successive, inter) RoPE positions of queries at absolute `positions`."""
    s, c = dca.chunk_len, dca.chunk_size
    r = positions % s
    succ = (r + s).clamp(max=c)
    inter = torch.full_like(r, min(2 * s - 1, c))
    return r, succ, inter


def length_mscale(length: int, dca: DCAConfig) -> float:
    """Attention temperature of the 1M models; 1.0 when disabled or within the original window."""
    lo = dca.original_max_position_embeddings
    if not lo or length <= lo:
        return 1.0
    return max(1.0, 0.1 * math.log(length / lo) + 1.0)


def _query_temperature(p0: int, p1: int, dca: DCAConfig, device) -> torch.Tensor | float:
    """mscale^2 for queries at positions p0..p1-1, from the length each of them sees (p + 1).

    Per query rather than per call, so a prefill followed by decode steps gives exactly the
    logits of one long forward (vLLM uses the sequence length of the call instead).
    """
    if not dca.original_max_position_embeddings or p1 <= dca.original_max_position_embeddings:
        return 1.0
    m = torch.tensor([length_mscale(p + 1, dca) for p in range(p0, p1)], dtype=torch.float64)
    return (m * m).to(device)[:, None]


def dual_chunk_attention(q_intra: torch.Tensor, q_succ: torch.Tensor, q_inter: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor, q_start: int, dca: DCAConfig,
                         scale: float, tile: int = 512) -> torch.Tensor:
    """DCA for one sequence.

    q_*: [Hkv, g, T, d] — the same queries rotated for the three ranges (g query heads share
      each KV head); they sit at absolute positions q_start .. q_start + T - 1.
    k, v: [Hkv, S, d] with S = q_start + T; key j is at absolute position j and was rotated
      by j % chunk_len.
    Returns [Hkv, g, T, d] in the dtype of v. Scores and softmax sums are kept in float32
    (float64 inputs stay float64).
    """
    s = dca.chunk_len
    T = q_intra.shape[-2]
    acc_dtype = torch.promote_types(q_intra.dtype, torch.float32)  # float32 at least
    out = torch.empty(q_intra.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    t = 0
    while t < T:
        p0 = q_start + t
        n = p0 // s
        # A query tile never straddles a chunk boundary: its three key ranges are shared.
        t_end = min(T, t + tile, (n + 1) * s - q_start)
        p1 = q_start + t_end  # exclusive
        ranges = (
            (0, max(0, (n - 1) * s), q_inter, False),
            (max(0, (n - 1) * s), n * s, q_succ, False),
            (n * s, p1, q_intra, True),
        )
        acc = None
        temperature = _query_temperature(p0, p1, dca, q_intra.device)
        for k0, k1, q_all, causal in ranges:
            if k1 <= k0:
                continue
            q = q_all[..., t:t_end, :].to(acc_dtype) * scale
            q = q * (temperature.to(acc_dtype) if torch.is_tensor(temperature) else temperature)
            for a in range(k0, k1, tile):
                b = min(k1, a + tile)
                scores = q @ k[:, None, a:b].to(acc_dtype).transpose(-1, -2)  # [Hkv, g, tq, tk]
                if causal:
                    qpos = torch.arange(p0, p1, device=k.device)[:, None]
                    kpos = torch.arange(a, b, device=k.device)[None, :]
                    scores = scores.masked_fill(kpos > qpos, float("-inf"))
                acc = _online_softmax_step(acc, scores, v[:, None, a:b].to(acc_dtype))
        m, l, o = acc
        out[..., t:t_end, :] = (o / l).to(v.dtype)
        t = t_end
    return out


def _online_softmax_step(acc, scores: torch.Tensor, v: torch.Tensor):
    """Fold one tile of scores into running (max, sum of exp, weighted values)."""
    tile_max = scores.amax(dim=-1, keepdim=True)
    if acc is None:
        m = tile_max
        p = torch.exp(scores - m)
        return m, p.sum(-1, keepdim=True), p @ v
    m_old, l_old, o_old = acc
    m = torch.maximum(m_old, tile_max)
    # A fully masked row keeps -inf; exp(-inf - -inf) would be nan, so guard the rescale.
    alpha = torch.where(torch.isfinite(m_old), torch.exp(m_old - m), torch.zeros_like(m))
    p = torch.exp(scores - m)
    return m, l_old * alpha + p.sum(-1, keepdim=True), o_old * alpha + p @ v
