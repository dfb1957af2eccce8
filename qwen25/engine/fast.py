"""Bind a dense model and a KVCache to the C++ decoder (`kernels/decode.cpp`).

The decoder reads the model's own parameter tensors and the cache's tensors in place (no
copy, no fused weights: q/k/v and gate/up share one parallel pass in C++ instead), so
memory stays weights + cache and the checkpoint layout is untouched. Optimizer steps and
`load_state_dict` update the tensors in place and are seen at once; if parameters are
*replaced* by new tensors, `stale()` reports it and the engine rebinds.

It covers what released dense Qwen2.5 checkpoints need on CPU: float32 or bfloat16
weights, plain `nn.Linear` projections, standard (RoPE/YaRN-table) attention. Anything else
(MoE, dual chunk attention, quantized modules, fp16, GPU) is left to the PyTorch model,
and `unsupported_reason(model)` says why.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from qwen25.engine import kernels
from qwen25.model.kv_cache import KVCache
from qwen25.model.attention import Attention
from qwen25.model.model import RMSNorm
from qwen25.model.moe import MLP
from qwen25.model.rope import cos_sin

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_PER_LAYER = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
              "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
              "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


def unsupported_reason(model, isa: str = "avx512") -> str | None:
    """Why the C++ decoder cannot run `model` with kernels `isa` (None when it can)."""
    cfg = model.config
    if model.device.type != "cpu":
        return f"the model is on {model.device}, the kernels are for CPU"
    if model.dtype not in _DTYPE_NAMES:
        return f"dtype {model.dtype} (the kernels cover float32 and bfloat16)"
    if cfg.is_moe:
        return "mixture-of-experts layers"
    if cfg.dual_chunk_attention is not None:
        return "dual chunk attention"
    if cfg.head_dim > 512 or cfg.head_dim % 2:
        return f"head_dim={cfg.head_dim}"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if type(attn) is not Attention or type(mlp) is not MLP or any(type(m) is not nn.Linear for m in linears):
            return "modified attention/MLP modules (e.g. quantized or adapted layers)"
        if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
            return "modified norm modules"
    if type(model.lm_head) is not nn.Linear or type(model.model.norm) is not RMSNorm:
        return "a modified lm_head or final norm"
    if isa == "portable":
        return None if kernels.load() is not None else kernels.unavailable_reason()
    if kernels.best_isa(_DTYPE_NAMES[model.dtype]) is None:
        why = kernels.unavailable_reason()
        return why or f"this CPU lacks the AVX-512 features for {_DTYPE_NAMES[model.dtype]} kernels"
    return None


class FastDecoder:
    """One call per decode step: embeddings in, logits [M, vocab] float32 out."""

    def __init__(self, model, cache: KVCache, isa: str = "avx512", threads: int | None = None):
        reason = unsupported_reason(model, isa)
        if reason is not None:
            raise RuntimeError(f"the C++ decoder cannot run this model: {reason}")
        lib = kernels.load()
        cfg = model.config
        self.model, self.cache, self.lib = model, cache, lib
        self.threads = threads  # None: torch.get_num_threads() at each call
        self.dtype = model.dtype
        # Every tensor the C++ side reads, kept referenced (and contiguous) here.
        self._tensors = self._collect(model, cache)
        ptrs = [t.data_ptr() for t in self._tensors["layers"]]
        layer_arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        k_arr = (ctypes.c_void_p * len(cache.k))(*[t.data_ptr() for t in cache.k])
        v_arr = (ctypes.c_void_p * len(cache.v))(*[t.data_ptr() for t in cache.v])
        handle = lib.q25_decoder_new(
            kernels.DTYPE_CODES[_DTYPE_NAMES[self.dtype]], kernels.ISAS[isa], cfg.num_hidden_layers,
            cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size, cfg.rms_norm_eps, layer_arr, self._tensors["norm"].data_ptr(),
            self._tensors["lm_head"].data_ptr(), k_arr, v_arr, cache.slots, cache.max_seq_len)
        if not handle:
            raise RuntimeError("the C++ decoder rejected this model configuration")
        self._handle = handle
        self._signature = self.signature(model)

    @staticmethod
    def _collect(model, cache: KVCache) -> dict:
        layers = []
        for layer in model.model.layers:
            params = dict(layer.named_parameters())
            for name in _PER_LAYER:
                t = params[name].detach()
                if not t.is_contiguous():
                    raise RuntimeError(f"parameter {name} is not contiguous")
                layers.append(t)
        for t in cache.k + cache.v:
            assert t.is_contiguous() and t.dtype == model.dtype
        return {"layers": layers, "norm": model.model.norm.weight.detach(),
                "lm_head": model.lm_head.weight.detach().contiguous()}

    @staticmethod
    def signature(model) -> tuple:
        """Addresses of every parameter: changes when a parameter tensor is replaced."""
        return tuple(p.data_ptr() for p in model.parameters())

    def stale(self) -> bool:
        return self.signature(self.model) != self._signature

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle:
            self.lib.q25_decoder_free(handle)
            self._handle = None

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens, slots, positions: int64 [M] (position = tokens already cached in the slot).

        Writes the new k/v at `positions` of each slot (the caller advances the lengths) and
        returns (logits [M, vocab] float32 holding values of the compute dtype, their
        log-sum-exp [M], their argmax [M]).
        """
        model = self.model
        M = tokens.shape[0]
        x = model.model.embed_tokens(tokens).contiguous()  # [M, h]
        cos, sin = cos_sin(model.rope_inv_freq(positions), positions, model.attention_scaling, dtype=self.dtype)
        cos, sin = cos.contiguous(), sin.contiguous()  # [M, head_dim]
        slots = slots.contiguous()
        positions = positions.contiguous()
        logits = torch.empty(M, model.config.vocab_size, dtype=torch.float32)
        lse = torch.empty(M, dtype=torch.float32)
        argmax = torch.empty(M, dtype=torch.int64)
        rc = self.lib.q25_decoder_step(self._handle, M, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                       slots.data_ptr(), positions.data_ptr(), logits.data_ptr(),
                                       lse.data_ptr(), argmax.data_ptr(), self.threads or torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("decode step rejected: a slot or position is outside the cache")
        return logits, lse, argmax
