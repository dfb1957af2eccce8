"""GPTQ / AWQ layouts: packing against slow references written from the formats' definitions,
quantized checkpoint folders (save, load, shapes checked against the quantized model), and
one-line errors for configs and tensors we do not read.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen25 import ModelConfig, build_model
from qwen25.checkpoint import CheckpointError
from qwen25.quant.checkpoint import load_quantized, save_quantized
from qwen25.quant.layouts import AWQ_ORDER, awq_pack, awq_unpack, gptq_pack, gptq_unpack
from qwen25.quant.modules import QuantLinear, quantize_model
from qwen25.quant.rtn import quantize_rtn


def u32(v: int) -> int:
    return v & 0xFFFFFFFF


def slow_gptq_dequant(t: dict, bits: int, zero_offset: int = 1) -> torch.Tensor:
    """W[n, k] = scales[g, n] * (q[n, k] - (stored zero[g, n] + offset)), g = g_idx[k], read bit
    by bit from the int32 words as the GPTQ format defines them."""
    f = 32 // bits
    mask = 2**bits - 1
    qw, qz, sc, gi = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    k, n = qw.shape[0] * f, qw.shape[1]
    w = torch.zeros(n, k, dtype=torch.float64)
    for kk in range(k):
        g = int(gi[kk])
        for nn_ in range(n):
            q = (u32(int(qw[kk // f, nn_])) >> (bits * (kk % f))) & mask
            z = ((u32(int(qz[g, nn_ // f])) >> (bits * (nn_ % f))) & mask) + zero_offset
            w[nn_, kk] = float(sc[g, nn_]) * (q - z)
    return w


def slow_awq_dequant(t: dict, group: int) -> torch.Tensor:
    """AWQ: word (k, c) nibble i holds channel 8c + AWQ_ORDER[i]; zeros packed alike."""
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    k, n = qw.shape[0], qw.shape[1] * 8
    w = torch.zeros(n, k, dtype=torch.float64)
    for kk in range(k):
        for c in range(n // 8):
            for i, ch in enumerate(AWQ_ORDER):
                q = (u32(int(qw[kk, c])) >> (4 * i)) & 15
                z = (u32(int(qz[kk // group, c])) >> (4 * i)) & 15
                w[c * 8 + ch, kk] = float(sc[kk // group, c * 8 + ch]) * (q - z)
    return w


def module_weight(q, s, z, bits, perm=None) -> torch.Tensor:
    return QuantLinear.from_codes(q, s, z, bits, None, torch.float32, perm).dequantized(torch.float64)


@pytest.mark.parametrize("bits,group,sym", [(4, 16, False), (4, 32, True), (8, 16, True), (8, 32, False)])
def test_gptq_packing_matches_the_format_definition(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q, s, z = quantize_rtn(w, bits, group, sym)
    t = gptq_pack(q, s, z, bits, group)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (64 * bits // 32, 16)
    assert t["qzeros"].shape == (64 // group, 16 * bits // 32) and t["scales"].dtype == torch.float16
    s16 = s.half().float()  # the layout stores float16 scales
    torch.testing.assert_close(slow_gptq_dequant(t, bits), module_weight(q, s16, z, bits), rtol=0, atol=0)
    q2, s2, z2, perm = gptq_unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, group)
    assert perm is None and torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s16)


def test_gptq_act_order_g_idx_round_trip():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    perm = torch.randperm(64)
    q, s, z = quantize_rtn(w[:, perm], 4, 16)
    t = gptq_pack(q, s, z, 4, 16, perm)
    assert not torch.equal(t["g_idx"], torch.arange(64) // 16)
    ref = slow_gptq_dequant(t, 4)
    torch.testing.assert_close(ref, module_weight(q, s.half().float(), z, 4, perm), rtol=0, atol=0)
    q2, s2, z2, perm2 = gptq_unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 16)
    torch.testing.assert_close(module_weight(q2, s2, z2, 4, perm2), ref, rtol=0, atol=0)


def test_gptq_v2_has_no_zero_offset():
    torch.manual_seed(2)
    q, s, z = quantize_rtn(torch.randn(8, 32), 4, 16)
    t = gptq_pack(q, s, z, 4, 16, zero_offset=0)
    torch.testing.assert_close(slow_gptq_dequant(t, 4, zero_offset=0), module_weight(q, s.half().float(), z, 4))


def test_awq_packing_matches_the_format_definition():
    torch.manual_seed(3)
    q, s, z = quantize_rtn(torch.randn(24, 64), 4, 32)
    t = awq_pack(q, s, z)
    assert t["qweight"].shape == (64, 3) and t["qzeros"].shape == (2, 3)
    ref = slow_awq_dequant(t, 32)
    torch.testing.assert_close(ref, module_weight(q, s.half().float(), z, 4), rtol=0, atol=0)
    q2, s2, z2 = awq_unpack(t["qweight"], t["qzeros"], t["scales"], 32)
    assert torch.equal(q2, q) and torch.equal(z2, z)


def tiny() -> ModelConfig:
    return ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, rope_theta=10_000.0)


@pytest.mark.parametrize("bits,group,method", [(8, None, "gptq"), (4, 32, "gptq"), (4, 64, "awq")])
def test_quantized_folder_round_trip(tmp_path, bits, group, method):
    model = quantize_model(build_model(tiny(), seed=0).eval(), bits, group)
    for m in model.modules():  # the layout keeps float16 scales: make ours exact in it
        if isinstance(m, QuantLinear):
            m.scales.copy_(m.scales.half().float())
    save_quantized(model, tmp_path / "q", method=method)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == method and qc["bits"] == bits
    assert qc["group_size"] == (group or -1)
    loaded = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    names = load_file(tmp_path / "q" / "model.safetensors").keys()
    assert "model.layers.0.mlp.down_proj.qweight" in names and "model.layers.0.mlp.down_proj.weight" not in names


def _saved(tmp_path, bits=4, group=32):
    model = quantize_model(build_model(tiny(), seed=0).eval(), bits, group)
    return save_quantized(model, tmp_path / "q")


def _edit_config(folder, **qc):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(qc)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change,match", [
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported"),
    ({"bits": 3}, "GPTQ with bits=3"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({"group_size": 64}, "has shape .*group_size=64"),
    ({"group_size": 0}, "group_size=0"),
])
def test_bad_quantization_config_is_one_line(tmp_path, change, match):
    folder = _saved(tmp_path)
    _edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=match) as e:
        load_quantized(folder)
    assert "\n" not in str(e.value)


def test_group_size_not_dividing_the_inputs(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, group_size=48)
    with pytest.raises(CheckpointError, match="group_size=48 does not divide the 64 inputs"):
        load_quantized(folder)


def test_float_weights_under_a_quantization_config(tmp_path):
    from qwen25 import save_model
    folder = save_model(build_model(tiny(), seed=0), tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no tensor is quantized"):
        load_quantized(folder)


def test_act_order_g_idx_without_desc_act_is_rejected(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="desc_act is false"):
        load_quantized(folder)
