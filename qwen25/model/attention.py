"""Grouped-query self-attention over `F.scaled_dot_product_attention`.

Qwen2 specifics (spec §1.4): biases on q/k/v only (o_proj has none), RoPE on q and k,
(Llama: the same without the q/k/v biases, `cfg.qkv_bias=False`),
scale head_dim^-0.5, KV head j serves query heads j*g .. j*g+g-1 (g = heads / kv_heads).
SDPA computes the softmax in float32 internally on CPU and GPU, and `enable_gqa` lets it
read the shared KV heads without materialising the repeated copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen25.config import ModelConfig
from qwen25.model.dca import dual_chunk_attention
from qwen25.model.rope import RotaryTables, apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.dropout = cfg.attention_dropout
        self.dca = cfg.dual_chunk_attention

    def forward(self, x: torch.Tensor, rope: RotaryTables, mask: torch.Tensor | None,
                kv_cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.dca is not None:
            y = self._dual_chunk(q, k, v, rope, kv_cache)
        else:
            q, k = apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_idx, k, v)  # [B, Hkv, S, d], S = cached + T
            y = sdpa(q, k, v, mask, dropout=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _dual_chunk(self, q, k, v, rope: RotaryTables, kv_cache) -> torch.Tensor:
        """DCA: keys rotated by their chunk offset, queries three ways (see dca.py).

        Key slot j of a row must hold absolute position j, which is how `KVCache` lays rows
        out and what a plain forward without padding gives.
        """
        (cos_k, sin_k), (cos_s, sin_s), (cos_i, sin_i) = rope.dca
        k = apply_rotary(k, cos_k, sin_k)
        qs = [apply_rotary(q, c, s) for c, s in ((cos_k, sin_k), (cos_s, sin_s), (cos_i, sin_i))]
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        B, H, T, d = q.shape
        g = H // self.n_kv
        out = []
        for b in range(B):
            start = int(rope.positions[b, 0])
            length = start + T
            grouped = [x[b].view(self.n_kv, g, T, d) for x in qs]  # heads j*g..j*g+g-1 share KV j
            y = dual_chunk_attention(*grouped, k[b, :, :length], v[b, :, :length], start, self.dca,
                                     scale=d ** -0.5)
            out.append(y.reshape(H, T, d))
        return torch.stack(out)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Causal GQA attention. mask: bool [B, 1, T, S] (True = attend) or None for causal.

    With mask None the T queries are the last T of the S keys (S == T or a single query),
    which is exactly SDPA's `is_causal` when S == T.
    """
    T, S = q.shape[-2], k.shape[-2]
    is_causal = mask is None and T > 1
    if is_causal and S != T:
        raise ValueError("causal attention without a mask needs as many keys as queries")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])
