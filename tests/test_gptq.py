"""GPTQ lowers a layer's output error against round-to-nearest on its calibration inputs."""

from __future__ import annotations

import pytest
import torch

from qwen25 import ModelConfig, build_model
from qwen25.quant.gptq import gptq_model, gptq_quantize, hessian
from qwen25.quant.modules import QuantLinear, quantize_model
from qwen25.quant.rtn import dequantize, quantize_rtn


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Activations with correlated channels and a few large ones, as in real layers (one
    fixed mixing matrix; `seed` draws the rows)."""
    mix = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k // 4, generator=g) @ mix
    x += 0.3 * torch.randn(n, k, generator=g)
    x[:, :4] *= 8
    return x


def output_error(x, w, q, s, z, group, perm=None) -> float:
    deq = dequantize(q, s, z, group)
    if perm is not None:
        full = torch.empty_like(deq)
        full[:, perm] = deq
        deq = full
    return float((x @ w.T - x @ deq.T).norm())


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, False, False), (4, 32, False, True),
                                                      (8, 128, True, False), (4, 128, True, False)])
def test_gptq_beats_round_to_nearest_on_a_layer(bits, group, sym, act_order):
    torch.manual_seed(0)
    k, n = 128, 96
    w = torch.randn(n, k)
    x = correlated_inputs(512, k, seed=1)
    rq, rs, rz = quantize_rtn(w, bits, group, sym)
    rtn = output_error(x, w, rq, rs, rz, group)
    q, s, z, perm = gptq_quantize(w, hessian([x]), bits, group, sym, act_order=act_order)
    gptq = output_error(x, w, q, s, z, group, perm)
    assert gptq < 0.8 * rtn, (gptq, rtn)
    held_out = correlated_inputs(256, k, seed=2)  # same distribution, other rows
    assert output_error(held_out, w, q, s, z, group, perm) < output_error(held_out, w, rq, rs, rz, group)


def test_dead_inputs_are_zeroed_not_nan():
    w = torch.randn(16, 32)
    x = torch.randn(64, 32)
    x[:, 5] = 0  # a channel that is never active
    q, s, z, _ = gptq_quantize(w, hessian([x]), 4, 32, False)
    assert torch.isfinite(s).all()
    assert dequantize(q, s, z, 32)[:, 5].abs().max() <= s.max()


def test_gptq_model_reduces_model_error_against_rtn():
    cfg = ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, rope_theta=10_000.0)
    ref = build_model(cfg, seed=0).eval()
    calib = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        target = [ref(ids) for ids in calib]
        rtn = quantize_model(build_model(cfg, seed=0).eval(), 4, 32)
        done = []
        gptq = gptq_model(build_model(cfg, seed=0).eval(), calib, bits=4, group_size=32,
                          progress=lambda i, n: done.append((i, n)))
        err_rtn = sum(float((rtn(ids) - t).norm()) for ids, t in zip(calib, target))
        err_gptq = sum(float((gptq(ids) - t).norm()) for ids, t in zip(calib, target))
    assert done == [(1, 2), (2, 2)]
    assert sum(isinstance(m, QuantLinear) for m in gptq.modules()) == 14
    assert err_gptq < err_rtn, (err_gptq, err_rtn)
