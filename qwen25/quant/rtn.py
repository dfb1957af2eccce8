"""Weight-only quantization grids as pure functions (round-to-nearest).

One representation serves every format this package reads or writes: for a weight
W [N, K] (N output channels, K inputs) split into groups of `group_size` consecutive
inputs, integer codes q [N, K] in [0, 2^bits), one float scale and one integer zero point
per (row, group), and

    W[n, k] ~= (q[n, k] - zero[n, k // group_size]) * scale[n, k // group_size].

- int8 (`bits=8`): symmetric per output channel by default (group_size = K); zero is
  fixed at 128 and codes are round(W / scale) + 128 with scale = max|W| / 127, so the
  grid is -127..127 around zero (what GPTQ-Int8 checkpoints store with `sym: true`).
- int4 (`bits=4`): asymmetric per group: scale = (max - min) / 15 and zero =
  round(-min / scale) (kept >= 1, see `grid`), so the group's range is on the grid.

Scales are float32 here (checkpoints store float16; `formats` casts at the border).
"""

from __future__ import annotations

import torch

# Smallest scale: a group of zeros gets this instead of 0 (no division by zero; its codes
# all equal the zero point, so it still dequantises to exact zeros).
_EPS = 1e-10


def check_groups(in_features: int, group_size: int) -> None:
    """Raise ValueError unless `group_size` splits `in_features` into whole, even groups."""
    if group_size <= 0 or group_size % 2 or in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features} "
                         "into whole groups; use a group size that divides it (32, 64, 128) "
                         "or the per-channel default")


def grid(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [N, G] (float32, integer-valued float32) of each group of w."""
    n, k = w.shape
    check_groups(k, group_size)
    g = w.float().reshape(n, k // group_size, group_size)
    qmax = 2**bits - 1
    if sym:
        scale = g.abs().amax(-1) / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = g.amin(-1).clamp(max=0)  # the range always holds 0, so zeros stay exact
        hi = g.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale.clamp(min=_EPS)).clamp(0, qmax)
        # Zero points stay >= 1: the GPTQ v1 layout stores zero - 1 in `bits` bits. A group
        # that would get 0 (no negative values to speak of) moves its grid up one step.
        low = zero < 1
        scale = torch.where(low, torch.maximum(hi / (qmax - 1), -lo), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale.clamp(min=_EPS), zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group_size: int) -> torch.Tensor:
    """Codes q [N, K] uint8 of w on the given grid (round to nearest, clamped)."""
    s = scale.repeat_interleave(group_size, dim=1)
    z = zero.repeat_interleave(group_size, dim=1)
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in `dtype` from codes, scales and zero points (computed in float32)."""
    s = scale.float().repeat_interleave(group_size, dim=1)
    z = zero.float().repeat_interleave(group_size, dim=1)
    return ((q.float() - z) * s).to(dtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None = None,
                 sym: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes [N, K] uint8, scale [N, G] float32, zero [N, G] uint8).

    Defaults: int8 symmetric per channel; int4 asymmetric in groups of 128.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: only 4 and 8 bit weights are supported")
    group_size = group_size or (w.shape[1] if bits == 8 else 128)
    sym = (bits == 8) if sym is None else sym
    scale, zero = grid(w, bits, group_size, sym)
    return quantize_with(w, scale, zero, bits, group_size), scale, zero.to(torch.uint8)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, K/2] bytes, column 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: [N, K/2] bytes -> [N, K] codes."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)
