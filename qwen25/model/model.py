"""The Qwen2.5 decoder (dense and MoE), numerically the same as HF `Qwen2ForCausalLM`.

What is notable (spec §1.4):
- pre-norm RMSNorm computed in float32, cast back, then scaled by the weight (no +1, no bias);
- biases on q/k/v only; SwiGLU MLP; RoPE with the half-split layout;
- no embedding scaling and no BOS; the final norm sits before the lm_head, which is the
  embedding matrix itself when `tie_word_embeddings`.
Module and parameter names equal the HF checkpoint keys (`model.layers.0.self_attn.q_proj
.weight`, ...), so loading is a rename-free copy (MoE experts are stacked, see moe.py).

Build on the meta device and materialise in one call: `build_model(cfg, device, dtype)`.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen25.config import ModelConfig
from qwen25.model.attention import Attention
from qwen25.model.moe import MLP, SparseMoE
from qwen25.model.rope import rope_parameters, rotary_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = SparseMoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, router_logits = self.mlp(h)
            return x + y, router_logits
        return x + self.mlp(h), None


class Decoder(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The RoPE table is a plain float32 attribute, not a buffer, so `model.to(bfloat16)`
        # can never round it; `rope_inv_freq()` follows the weights' device.
        self.inv_freq, self.attention_scaling = rope_parameters(cfg)

    # ---- forward -------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache=None, attention_mask: torch.Tensor | None = None,
                output_router_logits: bool = False, logits_at: torch.Tensor | None = None):
        """input_ids [B, T] -> logits [B, T, vocab] (in the weights' dtype).

        positions [B, T]: defaults to 0..T-1, or past the cached length with a `kv_cache`, or
          the count of real tokens before each one when `attention_mask` is given (so a
          left-padded row gives the same logits as the unpadded sequence).
        attention_mask [B, T]: 1 for real tokens, 0 for padding (HF convention; no cache);
          or bool [B, 1, T, T], True where query t may attend to key s, used as given (HF's
          custom 4-D mask; packed rows pass a block-diagonal causal mask with `positions`).
        output_router_logits: also return the per-MoE-layer router logits (for the aux loss).
        logits_at: bool [B, T]: compute the logits of these positions only, as [N, vocab] in
          row-major order (HF's `logits_to_keep`, per row): an SFT loss needs the head on the
          assistant tokens alone, and the head is the largest matmul of a small model.
        """
        h, router_logits = self.hidden_states(input_ids, positions, kv_cache, attention_mask)
        if logits_at is not None:
            h = h[logits_at]
        logits = self.lm_head(h)
        return (logits, router_logits) if output_router_logits else logits

    def hidden_states(self, input_ids, positions=None, kv_cache=None, attention_mask=None):
        """Final-normed hidden states [B, T, h] and the router logits of the MoE layers."""
        B, T = input_ids.shape
        mask = None
        if kv_cache is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask and kv_cache together are not supported: the "
                                 "cache tracks each row's length itself")
            mask, cache_positions = kv_cache.begin(T)
            positions = cache_positions if positions is None else positions
        elif attention_mask is not None:
            if self.config.dual_chunk_attention is not None:
                raise ValueError("dual chunk attention does not take a padding mask; run rows "
                                 "separately or through a KVCache")
            if attention_mask.dim() == 4:
                mask = attention_mask.bool()
            else:
                mask, pad_positions = padding_mask(attention_mask)
                positions = pad_positions if positions is None else positions
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        rope = rotary_tables(self.config, self.rope_inv_freq(positions), self.attention_scaling,
                             positions, x.dtype)
        router_logits = []
        for layer in self.model.layers:
            x, r = layer(x, rope, mask, kv_cache)
            if r is not None:
                router_logits.append(r)
        if kv_cache is not None:
            kv_cache.end()
        return self.model.norm(x), router_logits

    # ---- conveniences ----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def rope_inv_freq(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse frequencies on the weights' device (dynamic NTK: for these positions)."""
        sc = self.config.rope_scaling
        if sc is not None and sc.type == "dynamic" and positions is not None:
            longest = int(positions.max()) + 1
            original = sc.original_max_position_embeddings or self.config.max_position_embeddings
            if longest > original:
                return rope_parameters(self.config, longest)[0].to(self.device)
        if self.inv_freq.device != self.device:
            self.inv_freq = self.inv_freq.to(self.device)
        return self.inv_freq

    def set_rope(self, cfg: ModelConfig) -> None:
        """Swap how positions are handled (RoPE base and scaling, dual chunk attention) for
        that of `cfg`, a config of the same shapes; weights untouched."""
        self.config = cfg
        self.inv_freq, self.attention_scaling = rope_parameters(cfg)
        for layer in self.model.layers:  # attention reads its DCA config from the module
            layer.self_attn.dca = cfg.dual_chunk_attention

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def padding_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF padding mask [B, S] (1 real, 0 pad) -> (bool [B, 1, S, S] causal mask, positions).

    Positions count the real tokens before each one, so padding never shifts RoPE. A padded
    query row that could see no key at all may see itself, keeping softmax finite (its output
    is never used).
    """
    am = attention_mask.bool()
    S = am.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=am.device).tril()
    mask = causal[None] & am[:, None, :]  # [B, S(query), S(key)]
    mask |= torch.eye(S, dtype=torch.bool, device=am.device)[None] & ~am[:, :, None]
    positions = (am.long().cumsum(-1) - 1).clamp(min=0)
    return mask.unsqueeze(1), positions


# --------------------------------------------------------------------------------------
# Construction and initialisation
# --------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, init: bool = True, seed: int | None = None) -> Transformer:
    """Build on the meta device, materialise on `device` in `dtype`, then initialise.

    init=False leaves the weights uninitialised (a loader fills them right away).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()  # to_empty gives each module its own tensor; re-share the embedding
    if init:
        init_weights(model, seed)
    return model


@torch.no_grad()
def init_weights(model: Transformer, seed: int | None = None) -> None:
    """HF's convention: N(0, initializer_range) for matrices, zero biases, unit norm scales."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device).manual_seed(seed)
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)
