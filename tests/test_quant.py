"""int8/int4 weight-only quantization: grids, the module swap and the C++ decode kernels.

References: grids computed element by element from their definition (rtn.py's docstring);
kernel results against the float32 matmul with the dequantised weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwen25 import ModelConfig, build_model
from qwen25.quant import kernels
from qwen25.quant.modules import QuantLinear, quantize_model
from qwen25.quant.rtn import dequantize, pack_nibbles, quantize_rtn, unpack_nibbles

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"no int kernels: {kernels.unavailable_reason()}")


def slow_rtn(w: torch.Tensor, bits: int, group: int, sym: bool):
    """Codes, scales and zeros written out per group with Python scalars."""
    n, k = w.shape
    qmax = 2**bits - 1
    q = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // group)
    zeros = torch.zeros(n, k // group, dtype=torch.uint8)
    for r in range(n):
        for g in range(k // group):
            vals = [float(v) for v in w[r, g * group:(g + 1) * group]]
            if sym:
                s = max(abs(v) for v in vals) / (2 ** (bits - 1) - 1)
                z = 2 ** (bits - 1)
            else:
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                s = (hi - lo) / qmax
                z = min(max(round(-lo / s), 0), qmax)
                if z < 1:
                    s, z = max(hi / (qmax - 1), -lo), 1
            scales[r, g], zeros[r, g] = s, z
            for j, v in enumerate(vals):
                q[r, g * group + j] = min(max(round(v / torch.tensor(s, dtype=torch.float32).item()) + z, 0), qmax)
    return q, scales, zeros


@pytest.mark.parametrize("bits,group,sym", [(8, 48, True), (4, 16, False), (4, 48, False), (8, 16, False)])
def test_round_to_nearest_matches_the_definition(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(6, 96)
    w[0, :group] = w[0, :group].abs()  # a group without negative values (zero point kept >= 1)
    q, s, z = quantize_rtn(w, bits, group, sym)
    rq, rs, rz = slow_rtn(w, bits, group, sym)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert torch.equal(z, rz)
    # ties may round either way after the float32 division: allow one code of difference
    assert (q.int() - rq.int()).abs().max() <= 1 and (q != rq).float().mean() < 0.01
    err = (dequantize(q, s, z, group) - w).abs()
    assert (err <= s.repeat_interleave(group, 1) / 2 + 1e-6).all()  # round to nearest


def test_nibble_packing_matches_the_definition():
    q = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    packed = pack_nibbles(q)
    for r in range(5):
        for j in range(17):
            assert int(packed[r, j]) == int(q[r, 2 * j]) | (int(q[r, 2 * j + 1]) << 4)
    assert torch.equal(unpack_nibbles(packed), q)


CASES = [(8, None), (8, 64), (4, 32), (4, 64), (4, 128)]


@needs_kernels
@pytest.mark.parametrize("bits,group", CASES)
def test_kernel_equals_float_matmul_on_dequantised_weights(bits, group):
    torch.manual_seed(1)
    lin = nn.Linear(384, 203, bias=True)  # 203: rows not a multiple of the 4-row tile
    m = QuantLinear.from_linear(lin, bits, group)
    w = m.dequantized(torch.float64)
    for rows in (1, 3, 4, 7, 16):
        x = torch.randn(rows, 384)
        with torch.no_grad():
            y = m(x)
        ref = (x.double() @ w.T + lin.bias.double()).float()
        # fp32 sums of 384 products (|x q s| ~ 1): error well below 1e-4 relative
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("bits,group", CASES)
def test_kernel_is_batch_invariant(bits, group):
    torch.manual_seed(2)
    m = QuantLinear.from_linear(nn.Linear(256, 75, bias=False), bits, group)
    x = torch.randn(11, 256)
    y = kernels.qlinear(x, m.qweight, m.scales, m.zeros, bits, m.group_size, 75, threads=2)
    for i in range(11):
        alone = kernels.qlinear(x[i:i + 1], m.qweight, m.scales, m.zeros, bits, m.group_size, 75, threads=1)
        assert torch.equal(alone[0], y[i]), f"row {i}"


@pytest.mark.parametrize("bits,group", CASES)
def test_torch_path_equals_dequantised_matmul(bits, group):
    torch.manual_seed(3)
    lin = nn.Linear(128, 64)
    m = QuantLinear.from_linear(lin, bits, group)
    x = torch.randn(2, 20, 128)  # 40 rows: above the kernel's row limit
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ m.dequantized().T + lin.bias, rtol=1e-5, atol=1e-5)


def test_act_order_module_gathers_its_inputs():
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    perm = torch.randperm(64)
    q, s, z = quantize_rtn(w[:, perm], 4, 32)
    m = QuantLinear.from_codes(q, s, z, 4, None, torch.float32, perm)
    ref = torch.empty_like(w)
    ref[:, perm] = dequantize(q, s, z, 32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ ref.T, rtol=1e-5, atol=1e-5)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, rope_theta=10_000.0, **kw)


@pytest.mark.parametrize("bits,group,tol", [(8, None, 0.02), (4, 32, 0.3)])
def test_quantized_model_stays_close_to_the_float_model(bits, group, tol):
    model = build_model(tiny(), seed=0).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, bits, group)
        out = model(ids)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert type(model.lm_head) is nn.Linear  # head and embeddings stay float
    rel = (out - ref).norm() / ref.norm()
    assert rel < tol, rel


def test_bad_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide in_features=100"):
        QuantLinear.from_linear(nn.Linear(100, 8), 4, 64)
