"""Logits parity with transformers' Qwen2ForCausalLM / Qwen2MoeForCausalLM.

Reference: transformers 5 on the same weights, moved both ways through checkpoint folders
(HF save -> our load, our save -> HF load). Tolerance: fp32 max relative error
max|ours - ref| / max|ref| <= 1e-4; bf16 is judged against the fp32 logits: our bf16 error
may be at most 1.5x transformers' own bf16 error (plus 1e-3 of the logit range).
"""

from __future__ import annotations

import pytest
import torch

import qwen25
from conftest import randomize_
from qwen25.checkpoint import load_model, save_model
from qwen25.model.moe import load_balancing_loss

DENSE = {
    "tied-gqa2": dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "untied-mha": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa7-odd": dict(hidden_size=112, intermediate_size=150, num_hidden_layers=2,  # 0.5B-like 14/2
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                     rms_norm_eps=1e-5, rope_theta=1_000_000.0),
    "mqa-odd-head": dict(hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=False,
                         rope_theta=10_000.0),
}
MOE_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                moe_intermediate_size=24, shared_expert_intermediate_size=40)
MOE = {
    "moe": dict(MOE_BASE),
    "moe-renorm": dict(MOE_BASE, norm_topk_prob=True),
    "moe-sparse-step": dict(MOE_BASE, decoder_sparse_step=2, mlp_only_layers=[]),
    "moe-mlp-only": dict(MOE_BASE, mlp_only_layers=[0], tie_word_embeddings=True),
}
VOCAB = 300


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _ids(batch=2, seq=11, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


CASES = [(k, False, v) for k, v in DENSE.items()] + [(k, True, v) for k, v in MOE.items()]


@pytest.mark.parametrize("name,moe,kw", CASES, ids=[c[0] for c in CASES])
def test_hf_checkpoint_loads_with_same_logits(hf_qwen2, name, moe, kw):
    path, hf = hf_qwen2(moe=moe, vocab_size=VOCAB, **kw)
    ours = load_model(path, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("name,moe,kw", CASES, ids=[c[0] for c in CASES])
def test_our_checkpoint_loads_in_transformers(tmp_path, name, moe, kw):
    from transformers import AutoModelForCausalLM

    cfg = qwen25.ModelConfig.from_hf(_hf_style(kw, moe))
    ours = randomize_(qwen25.build_model(cfg, seed=1), seed=3)
    save_model(ours, tmp_path / "ours", max_shard_size="20KB")  # forces several shards
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = _ids(seed=1)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def _hf_style(kw: dict, moe: bool) -> dict:
    return dict(kw, model_type="qwen2_moe" if moe else "qwen2", vocab_size=VOCAB)


@pytest.mark.parametrize("name", ["tied-gqa2", "moe"])
def test_bf16_within_reference_error(hf_qwen2, name):
    moe = name.startswith("moe")
    kw = MOE[name] if moe else DENSE[name]
    path, hf32 = hf_qwen2(moe=moe, vocab_size=VOCAB, **kw)
    ids = _ids(seq=16)
    from transformers import AutoModelForCausalLM

    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours16 = load_model(path, dtype="bfloat16")
    assert ours16.dtype == torch.bfloat16
    with torch.no_grad():
        ref = hf32(ids).logits
        err_hf = rel_err(hf16(ids).logits, ref)
        err_ours = rel_err(ours16(ids), ref)
    assert err_ours <= 1.5 * err_hf + 1e-3, (err_ours, err_hf)


def test_left_padding_matches_unpadded(hf_qwen2):
    path, hf = hf_qwen2(vocab_size=VOCAB, **DENSE["gqa7-odd"])
    ours = load_model(path, dtype=torch.float32)
    a, b = _ids(1, 9, seed=5)[0], _ids(1, 5, seed=6)[0]
    pad = 0
    ids = torch.stack([a, torch.cat([torch.full((4,), pad), b])])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
        alone_b = ours(b[None])
    real = mask.bool()
    assert rel_err(out[real], ref[real]) <= 1e-4
    assert rel_err(out[1, 4:], alone_b[0]) <= 1e-4


def test_kv_cache_decode_matches_full_forward(hf_qwen2):
    path, _ = hf_qwen2(vocab_size=VOCAB, **DENSE["tied-gqa2"])
    model = load_model(path, dtype=torch.float32)
    ids = _ids(2, 12, seed=7)
    cache = qwen25.KVCache(model.config, 2, 16)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :7], kv_cache=cache)]
        steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 10)]
        steps.append(model(ids[:, 10:], kv_cache=cache))  # a 2-token chunk after decode
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_kv_cache_rows_of_different_lengths(hf_qwen2):
    """Right-padded ragged prefill, then per-row lengths: each row equals its own forward."""
    path, _ = hf_qwen2(vocab_size=VOCAB, **DENSE["untied-mha"])
    model = load_model(path, dtype=torch.float32)
    a, b = _ids(1, 8, seed=8)[0], _ids(1, 5, seed=9)[0]
    cache = qwen25.KVCache(model.config, 2, 16)
    batch = torch.stack([a, torch.cat([b, torch.zeros(3, dtype=torch.long)])])
    with torch.no_grad():
        first = model(batch, kv_cache=cache)
        cache.set_length(1, 5)
        nxt = torch.tensor([[11], [12]])
        second = model(nxt, kv_cache=cache)
        ref_a = model(torch.cat([a, nxt[0]])[None])
        ref_b = model(torch.cat([b, nxt[1]])[None])
    assert rel_err(first[0], ref_a[0, :8]) <= 1e-5
    assert rel_err(first[1, :5], ref_b[0, :5]) <= 1e-5
    assert rel_err(second[0, 0], ref_a[0, 8]) <= 1e-5
    assert rel_err(second[1, 0], ref_b[0, 5]) <= 1e-5


def test_load_balancing_loss_matches_transformers():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 7, 6, generator=g) for _ in range(3))
    mask = torch.ones(2, 7)
    mask[1, :3] = 0
    for m in (None, mask):
        ref = load_balancing_loss_func(logits, num_experts=6, top_k=2, attention_mask=m)
        ours = load_balancing_loss(logits, num_experts=6, top_k=2, token_mask=m)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-7)


def test_router_logits_returned_for_moe_layers():
    cfg = qwen25.ModelConfig.preset("tiny-moe").replace(vocab_size=VOCAB, mlp_only_layers=(1,))
    model = qwen25.build_model(cfg, seed=0)
    logits, router = model(_ids(2, 5), output_router_logits=True)
    assert logits.shape == (2, 5, VOCAB)
    assert len(router) == 1 and router[0].shape == (10, cfg.num_experts)


def test_expert_grouping_equals_explicit_loop():
    """The sorted-by-expert computation equals a token-by-token slow reference."""
    import torch.nn.functional as F

    from qwen25.model.moe import Experts, route

    torch.manual_seed(0)
    experts = Experts(5, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(9, 16)
    w, idx = route(torch.randn(9, 5), 3, renormalize=True)
    fast = experts(x, idx, w)
    slow = torch.zeros_like(x)
    for t in range(9):
        for j in range(3):
            e = int(idx[t, j])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            slow[t] += w[t, j] * (experts.down_proj[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
