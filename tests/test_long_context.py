"""YaRN and dual chunk attention against references.

YaRN: inverse frequencies and mscale vs transformers' rope init (exact to float32 rounding,
rtol 1e-6) and the spec's numeric vector; logits vs transformers with the same rope_scaling
at positions past the original window (fp32, max relative error 1e-4).
DCA: equals plain causal attention when the sequence fits in one chunk (1e-5); equals a slow
reference that builds the remapped position of every (query, key) pair explicitly (1e-5);
prefill + cached decode equals one full DCA forward (1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch

import qwen25
from conftest import randomize_
from qwen25.checkpoint import load_model
from qwen25.config import ConfigError, DCAConfig, ModelConfig, RopeScaling
from qwen25.model.rope import apply_rotary, cos_sin, default_inv_freq, rope_parameters


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ---------------------------------------------------------------------------------- YaRN

@pytest.mark.parametrize("factor,original,head_dim,theta", [
    (4.0, 32768, 128, 1e6), (2.0, 4096, 64, 1e4), (8.0, 1024, 64, 1e6), (1.5, 2048, 96, 5e5),
    (32.0, 8192, 128, 1e7),
])
def test_yarn_matches_transformers_rope_init(factor, original, head_dim, theta):
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    hf_cfg = Qwen2Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=original,
                         rope_parameters={"rope_theta": theta, **scaling})
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    cfg = ModelConfig(hidden_size=head_dim * 4, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, rope_theta=theta,
                      max_position_embeddings=original,
                      rope_scaling=RopeScaling("yarn", factor, original))
    inv, scale = rope_parameters(cfg)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-12)


def test_yarn_spec_vector():
    """Spec §4.1: d=128, base 1e6, s=4, L=32768 -> low 23, high 40, mscale 1.138629..."""
    from qwen25.model.rope import yarn_correction_range

    assert yarn_correction_range(128, 1e6, 32768, 32, 1) == (23, 40)
    cfg = ModelConfig.preset("7B").replace(rope_scaling=RopeScaling("yarn", 4.0, 32768))
    inv, mscale = rope_parameters(cfg)
    assert mscale == pytest.approx(1.138629, abs=1e-6)
    assert float(inv[0]) == pytest.approx(1.0, rel=1e-6)
    assert float(inv[23]) == pytest.approx(0.0069783, rel=1e-4)
    assert float(inv[40]) == pytest.approx(4.4457e-5, rel=1e-4)
    assert float(inv[63]) == pytest.approx(3.1023e-7, rel=1e-4)
    assert float(default_inv_freq(128, 1e6)[63]) == pytest.approx(1.2409e-6, rel=1e-4)


def test_yarn_factor_is_not_recomputed_from_max_positions():
    """The transformers pitfall: with max_position_embeddings == original (Qwen2.5 Instruct
    configs), factor must stay the explicit 4.0, not become 32768/32768 = 1."""
    cfg = ModelConfig.preset("0.5B").replace(rope_scaling=RopeScaling("yarn", 4.0, 32768))
    inv, mscale = rope_parameters(cfg)
    assert mscale > 1.1
    assert not torch.allclose(inv, default_inv_freq(cfg.head_dim, cfg.rope_theta))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_scaled_rope_logits_match_transformers_past_the_window(hf_qwen2, scaling):
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=200, max_position_embeddings=16,
              rope_parameters={"rope_theta": 10000.0, **scaling})
    path, hf = hf_qwen2(**kw)
    ours = load_model(path, dtype=torch.float32)
    assert ours.config.rope_scaling.type == scaling["rope_type"]
    ids = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(0))  # 3x window
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def test_rope_scaling_cli_spec_and_errors():
    assert RopeScaling.parse("yarn:4", 32768) == RopeScaling("yarn", 4.0, 32768)
    with pytest.raises(ConfigError, match="rope_scaling.type='ntk-by-magic'"):
        RopeScaling.parse("ntk-by-magic:2", 4096)
    with pytest.raises(ConfigError, match="TYPE:FACTOR"):
        RopeScaling.parse("yarn:four", 4096)
    with pytest.raises(ConfigError, match="factor"):
        RopeScaling("yarn", 0.5, 4096)


def test_dca_chunk_smaller_than_local_window_is_an_error():
    with pytest.raises(ConfigError, match="chunk_size=8 must be larger than local_size=8"):
        DCAConfig(chunk_size=8, local_size=8)
    with pytest.raises(ConfigError, match="dual_chunk_attention_config"):
        ModelConfig.from_hf(ModelConfig.preset("tiny").to_hf() |
                            {"dual_chunk_attention_config": {"chunk_size": 4, "local_size": 9}})


# ---------------------------------------------------------------------------------- DCA

def _dca_model(dca: DCAConfig | None, seed=0, **changes):
    cfg = ModelConfig.preset("tiny").replace(vocab_size=128, num_attention_heads=4,
                                            num_key_value_heads=2, dual_chunk_attention=dca,
                                            **changes)
    return randomize_(qwen25.build_model(cfg, seed=seed), seed=seed, std=0.3).eval()


def test_dca_equals_causal_attention_within_one_chunk():
    plain = _dca_model(None)
    dca = _dca_model(DCAConfig(chunk_size=40, local_size=8))  # chunk_len 32 >= 30 tokens
    dca.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(dca(ids), plain(ids)) <= 1e-5


def slow_dca_attention(q, k, v, inv_freq, dca: DCAConfig, scale):
    """Explicit reference: for every (i, j <= i) pick the remapped query position, rotate,
    score; one softmax per query. q [H, S, d], k/v [H, S, d] before RoPE (MHA)."""
    s, c = dca.chunk_len, dca.chunk_size
    S = q.shape[1]
    pos = torch.arange(S)
    qpos = torch.empty(S, S, dtype=torch.long)  # [query, key] -> RoPE position of the query
    for i in range(S):
        for j in range(S):
            ni, nj = i // s, j // s
            if nj == ni:
                qpos[i, j] = i % s
            elif nj == ni - 1:
                qpos[i, j] = min(i % s + s, c)
            else:
                qpos[i, j] = min(2 * s - 1, c)
    kc, ks = cos_sin(inv_freq, pos % s, dtype=torch.float64)
    k_rot = apply_rotary(k[None], kc[None], ks[None])[0]
    out = torch.zeros_like(q)
    for i in range(S):
        qc, qs = cos_sin(inv_freq, qpos[i, : i + 1], dtype=torch.float64)  # [i+1, d]
        qi = q[:, i][:, None, :] * qc + torch.cat([-q[:, i, q.shape[-1] // 2:],
                                                  q[:, i, : q.shape[-1] // 2]], -1)[:, None, :] * qs
        lo = dca.original_max_position_embeddings
        temp = max(1.0, 0.1 * math.log((i + 1) / lo) + 1) ** 2 if lo and i + 1 > lo else 1.0
        scores = (qi * k_rot[:, : i + 1]).sum(-1) * scale * temp  # [H, i+1]
        out[:, i] = torch.einsum("hj,hjd->hd", torch.softmax(scores, -1), v[:, : i + 1])
    return out


@pytest.mark.parametrize("chunk_size,local_size,S,original", [
    (10, 4, 27, None), (12, 3, 40, None), (7, 2, 23, None), (10, 6, 25, None), (10, 4, 30, 8)])
def test_dca_attention_equals_slow_reference(chunk_size, local_size, S, original):
    from qwen25.model.dca import dual_chunk_attention, query_positions

    torch.manual_seed(0)
    dca = DCAConfig(chunk_size=chunk_size, local_size=local_size,
                    original_max_position_embeddings=original)
    H, d = 3, 16
    q, k, v = (torch.randn(H, S, d, dtype=torch.float64) for _ in range(3))
    inv_freq = default_inv_freq(d, 100.0).double()
    pos = torch.arange(S)
    tabs = [cos_sin(inv_freq, p, dtype=torch.float64) for p in query_positions(pos, dca)]
    rot = [apply_rotary(q[None], c[None], s_[None])[0] for c, s_ in tabs]
    k_rot = apply_rotary(k[None], tabs[0][0][None], tabs[0][1][None])[0]
    scale = d ** -0.5
    # tile=4 forces queries and keys to be split into many tiles inside each range
    fast = dual_chunk_attention(*(r[:, None] for r in rot), k_rot, v, 0, dca, scale, tile=4)[:, 0]
    slow = slow_dca_attention(q, k, v, inv_freq, dca, scale)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_dca_prefill_then_cached_decode_equals_full_forward():
    model = _dca_model(DCAConfig(chunk_size=12, local_size=4))  # chunk_len 8, 40 tokens = 5 chunks
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    cache = qwen25.KVCache(model.config, 2, 48)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :13], kv_cache=cache)]  # prefill crossing a chunk boundary
        parts.append(model(ids[:, 13:30], kv_cache=cache))  # a second prefill chunk
        parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(30, 40)]  # decode
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


def test_dca_with_yarn_and_length_mscale():
    """YaRN tables and the 1M models' length temperature compose with DCA."""
    from qwen25.model.dca import length_mscale

    dca = DCAConfig(chunk_size=12, local_size=4, original_max_position_embeddings=16)
    assert length_mscale(16, dca) == 1.0
    assert length_mscale(64, dca) == pytest.approx(0.1 * math.log(4) + 1)
    model = _dca_model(dca, rope_scaling=RopeScaling("yarn", 4.0, 16))
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = qwen25.KVCache(model.config, 1, 40)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :39], kv_cache=cache), model(ids[:, 39:], kv_cache=cache)]
    assert torch.isfinite(full).all()
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5
