"""`QuantLinear` (weight-only int8/int4 linear layer) and the module swap that installs it.

Quantizing is a transformation of an unmodified model: `quantize_model` replaces the
`nn.Linear` projections of every decoder layer with `QuantLinear` modules holding integer
codes, per-group scales and zero points (qwen25/quant/rtn.py) and leaves embeddings, norms
and the lm_head in the model's dtype (as the released GPTQ/AWQ checkpoints do).

Forward: a few input rows (decode) on a CPU with AVX-512 run the C++ kernel, which reads
each code once; anything else (prefill, GPU, other CPUs) dequantises the weight to the
input's dtype and calls F.linear. Both compute (q - zero) * scale exactly in fp32, so they
agree to summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwen25.quant import kernels
from qwen25.quant.rtn import check_groups, dequantize, pack_nibbles, quantize_rtn, unpack_nibbles

# Rows at or below which the C++ kernel runs (decode steps, small server batches); above,
# dequantise + GEMM wins because the GEMM reuses each weight many times.
KERNEL_MAX_ROWS = 16
# The projections quantized in each decoder layer (HF Qwen2 names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantLinear(nn.Module):
    """y = x @ ((q - zero) * scale)^T + bias, weights as integer codes.

    Buffers: `qweight` uint8 [N, K] (bits=8) or [N, K/2] (bits=4, column 2j in the low
    nibble of byte j); `scales` float32 [N, K/group_size]; `zeros` uint8 [N, K/group_size];
    `perm` int64 [K] or None: with act-order checkpoints the stored columns are the input
    columns `perm` (so each group is contiguous) and the input is gathered the same way.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool, dtype: torch.dtype = torch.float32, device=None, act_order: bool = False):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: only 4 and 8 bit weights are supported")
        check_groups(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        cols = in_features if bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("perm", torch.arange(in_features, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.threads: int | None = None  # kernel threads; None: torch.get_num_threads()

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   bias: torch.Tensor | None, dtype: torch.dtype, perm: torch.Tensor | None = None) -> QuantLinear:
        """A module from codes [N, K] (stored-column order), scales and zeros [N, G]."""
        n, k = q.shape
        group_size = k // scales.shape[1]
        if scales.shape != zeros.shape or group_size * scales.shape[1] != k:
            raise ValueError(f"scales {list(scales.shape)} and zeros {list(zeros.shape)} do not "
                             f"split {k} input columns into equal groups")
        mod = cls(k, n, bits, group_size, bias is not None, dtype, q.device, act_order=perm is not None)
        with torch.no_grad():
            mod.qweight.copy_(pack_nibbles(q) if bits == 4 else q.to(torch.uint8))
            mod.scales.copy_(scales.float())
            mod.zeros.copy_(zeros.to(torch.uint8))
            if perm is not None:
                mod.perm.copy_(perm)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    sym: bool | None = None) -> QuantLinear:
        """Round-to-nearest quantization of an nn.Linear."""
        w = linear.weight.detach()
        q, s, z = quantize_rtn(w, bits, group_size, sym)
        return cls.from_codes(q, s, z, bits, linear.bias, w.dtype)

    def codes(self) -> torch.Tensor:
        """Codes [N, K] uint8 in stored-column order."""
        return unpack_nibbles(self.qweight) if self.bits == 4 else self.qweight

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in the input's column order (act-order undone)."""
        w = dequantize(self.codes(), self.scales, self.zeros, self.group_size, dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        y = None
        # the kernel has no backward: inputs that need a gradient take the PyTorch path
        if rows.shape[0] <= KERNEL_MAX_ROWS and x.device.type == "cpu" and not (
                x.requires_grad and torch.is_grad_enabled()):
            y = kernels.qlinear(rows, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                self.out_features, self.threads)
        if y is None:
            w = dequantize(self.codes(), self.scales, self.zeros, self.group_size, x.dtype)
            return F.linear(x, w, self.bias)
        if self.bias is not None:  # added in fp32, rounded once (as F.linear and the decoder do)
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, act_order={self.perm is not None}")


def projections(model) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every projection to quantize."""
    found = []
    for i, layer in enumerate(model.model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for attr in PROJECTIONS:
                if isinstance(getattr(parent, attr, None), (nn.Linear, QuantLinear)):
                    found.append((f"model.layers.{i}.{parent_name}.{attr}", parent, attr))
    return found


def swap(model, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace each projection `linear` named `name` by `make(name, linear)`, in place."""
    for name, parent, attr in projections(model):
        setattr(parent, attr, make(name, getattr(parent, attr)))


def quantize_model(model, bits: int, group_size: int | None = None, sym: bool | None = None,
                   lm_head: bool = False):
    """Round-to-nearest weight-only quantization of every projection, in place; returns model.

    bits=8: symmetric, per output channel unless group_size is given; bits=4: asymmetric,
    groups of 128 unless given. lm_head=True also quantizes the output head, to int8 per
    channel (a tied embedding keeps its float table for lookups; decode reads the int8
    copy: on small models the head is a quarter of the bytes per token). Such a model runs
    and exports to GGUF, but has no GPTQ-folder layout. MoE experts are not covered.
    """
    if model.config.is_moe:
        raise ValueError("quantizing mixture-of-experts models is not supported yet")
    with torch.no_grad():
        swap(model, lambda name, lin: QuantLinear.from_linear(lin, bits, group_size, sym)
             if isinstance(lin, nn.Linear) else lin)
        if lm_head and isinstance(model.lm_head, nn.Linear):
            model.lm_head = QuantLinear.from_linear(model.lm_head, 8)
    return model


def is_quantized(model) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def float_state_dict(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF checkpoint keys -> float tensors, quantized projections dequantised (for export).

    The tied lm_head is included (exporters drop it when the config says tied).
    """
    quant = {name: getattr(parent, attr) for name, parent, attr in projections(model)
             if isinstance(getattr(parent, attr), QuantLinear)}
    skip = tuple(f"{name}." for name in quant)
    if isinstance(model.lm_head, QuantLinear):
        quant["lm_head"] = model.lm_head
        skip += ("lm_head.",)
    state = {k: v.to(dtype) for k, v in model.state_dict().items() if not k.startswith(skip)}
    for name, m in quant.items():
        state[f"{name}.weight"] = m.dequantized(dtype)
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach().to(dtype)
    return state
