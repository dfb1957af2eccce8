"""Weight-only quantization: int8 / int4 module swaps (RTN, GPTQ) and the GPTQ/AWQ layouts.

    from qwen25.quant import quantize_model, gptq_model, save_quantized, load_quantized
    quantize_model(model, bits=8)              # int8, symmetric, per output channel
    quantize_model(model, bits=4, group_size=64)
    gptq_model(model, calibration_ids, bits=4, group_size=128)
    save_quantized(model, "out/")              # GPTQ layout + quantization_config
    model = load_quantized("Qwen2.5-0.5B-Instruct-GPTQ-Int4/")   # also AWQ folders

Nothing is imported until used (`import qwen25.quant` stays cheap).
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "QuantLinear": "qwen25.quant.modules", "quantize_model": "qwen25.quant.modules",
    "is_quantized": "qwen25.quant.modules",
    "gptq_model": "qwen25.quant.gptq", "gptq_quantize": "qwen25.quant.gptq",
    "save_quantized": "qwen25.quant.checkpoint", "load_quantized": "qwen25.quant.checkpoint",
    "QuantSpec": "qwen25.quant.checkpoint",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen25.quant' has no attribute {name!r}")
