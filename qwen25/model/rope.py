"""Rotary position embedding as pure functions: inverse frequencies, cos/sin tables, rotation.

Layout is the half-split ("NeoX", `rotate_half`) one of the HF checkpoints: dimension j is
paired with j + d/2, so loading official weights needs no permutation of q/k rows.

Context extension (spec §4.1):
- ABF: a larger `rope_theta` (the long-context pretraining stage raises 1e4 -> 1e6);
- YaRN ("NTK-by-parts" + attention temperature): high-frequency pairs unchanged, low-frequency
  pairs divided by the factor, a linear ramp in between; cos and sin are multiplied by
  mscale = 0.1 ln(s) + 1, which scales the attention logits by mscale^2;
- linear position interpolation, and dynamic NTK (base grows with the current length).
All tables are computed in float32 and only then cast to the activation dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from qwen25.config import ModelConfig, RopeScaling
from qwen25.model.dca import query_positions


class RotaryTables(NamedTuple):
    """What attention needs to place tokens: cos/sin [B, T, d] of each token's position.

    With dual chunk attention, `dca` holds (cos, sin) for the key/intra, successive and inter
    query positions instead, and `positions` [B, T] are the absolute positions.
    """

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    positions: torch.Tensor
    dca: tuple | None = None


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta_j = base^(-2j/d), j = 0..d/2-1, float32 (the exponent from an int64 arange)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    return 1.0 / (theta ** exponent)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(head_dim: int, theta: float, original_len: int, beta_fast: float,
                          beta_slow: float, truncate: bool = True) -> tuple[float, float]:
    """Pair indices (low, high) whose wavelengths make beta_fast / beta_slow turns over L."""

    def dim_for(rotations: float) -> float:
        return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def yarn_inv_freq(head_dim: int, theta: float, scaling: RopeScaling,
                  original_len: int) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and the cos/sin multiplier (attention factor)."""
    s = scaling.factor
    base = default_inv_freq(head_dim, theta)
    low, high = yarn_correction_range(head_dim, theta, original_len, scaling.beta_fast,
                                      scaling.beta_slow, scaling.truncate)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1: keep the pretrained frequency; 0: interpolate (divide by s)
    inv_freq = (base / s) * (1.0 - extrapolate) + base * extrapolate
    if scaling.attention_factor is not None:
        attn = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attn = yarn_mscale(s, scaling.mscale) / yarn_mscale(s, scaling.mscale_all_dim)
    else:
        attn = yarn_mscale(s)
    return inv_freq, float(attn)


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, original_len: int,
                         seq_len: int) -> torch.Tensor:
    """Dynamic NTK: past the trained length, raise the base so the longest wavelength fits."""
    if seq_len <= original_len:
        return default_inv_freq(head_dim, theta)
    base = theta * ((factor * seq_len / original_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, base)


def rope_parameters(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [d/2] float32, attention_scaling) for a model config.

    `seq_len` matters only for dynamic NTK (the longest position the tables must cover).
    The correction range of YaRN comes from `original_max_position_embeddings`, never from a
    factor recomputed out of `max_position_embeddings` (a known transformers pitfall).
    """
    d, theta, sc = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    if sc is None:
        return default_inv_freq(d, theta), 1.0
    original = sc.original_max_position_embeddings or cfg.max_position_embeddings
    if sc.type == "yarn":
        return yarn_inv_freq(d, theta, sc, original)
    if sc.type == "linear":
        return default_inv_freq(d, theta) / sc.factor, 1.0
    if sc.type == "dynamic":
        return dynamic_ntk_inv_freq(d, theta, sc.factor, original, seq_len or original), 1.0
    raise AssertionError(sc.type)  # RopeScaling validates the type


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_scaling: float = 1.0,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions of any shape -> [..., d] each, in `dtype`."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, d]; cos/sin: [B, T, d] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rotary_tables(cfg: ModelConfig, inv_freq: torch.Tensor, attention_scaling: float,
                  positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
    """cos/sin tables for one forward (three sets of them under dual chunk attention)."""
    if cfg.dual_chunk_attention is None:
        cos, sin = cos_sin(inv_freq, positions, attention_scaling, dtype)
        return RotaryTables(cos, sin, positions)
    # Keys use the intra-chunk table: both are the offset of the token inside its chunk.
    tables = tuple(cos_sin(inv_freq, p, attention_scaling, dtype)
                   for p in query_positions(positions, cfg.dual_chunk_attention))
    return RotaryTables(None, None, positions, tables)
