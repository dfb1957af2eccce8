"""AdamW parameter groups and the learning-rate schedules, at their edges.

The schedules are checked against their definitions written out independently here (a
slow closed form per step), and at the steps where off-by-one errors live: the first
step, the last warmup step, the first step after warmup, the first decay step, the last
step and past the end.
"""

import math

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.errors import UserError
from qwen25.model.model import build_model
from qwen25.train.optim import build_optimizer, constant, lr_multiplier, param_groups, warmup_cosine, wsd


def test_warmup_is_linear_and_reaches_peak_on_its_last_step():
    for fn in (lambda s: warmup_cosine(s, 100, 10), lambda s: wsd(s, 100, 10), lambda s: constant(s, 100, 10)):
        assert fn(0) == pytest.approx(0.1)
        assert fn(4) == pytest.approx(0.5)
        assert fn(9) == pytest.approx(1.0)
        assert fn(10) == pytest.approx(1.0)


def test_cosine_edges_and_midpoint():
    total, warm, lo = 102, 1, 0.1
    assert warmup_cosine(warm, total, warm, lo) == pytest.approx(1.0)
    assert warmup_cosine(total - 1, total, warm, lo) == pytest.approx(lo)
    assert warmup_cosine(total + 50, total, warm, lo) == pytest.approx(lo)  # past the end: stays at the floor
    mid = warm + (total - 1 - warm) // 2
    assert warmup_cosine(mid, total, warm, lo) == pytest.approx(lo + (1 - lo) / 2)
    values = [warmup_cosine(s, total, warm, lo) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup
    for s in range(warm, total):  # the closed form
        expect = lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - 1 - warm)))
        assert warmup_cosine(s, total, warm, lo) == pytest.approx(expect)


def test_cosine_without_warmup_and_degenerate_lengths():
    assert warmup_cosine(0, 10, 0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(9, 10, 0, 0.0) == pytest.approx(0.0)
    assert warmup_cosine(0, 1, 0, 0.2) == 1.0  # a one-step run trains at the peak
    assert warmup_cosine(3, 3, 3, 0.2) == 0.2  # warmup fills the run; past the end: the floor


def test_wsd_stable_then_linear_decay_to_floor_at_last_step():
    total, warm, frac, lo = 100, 5, 0.2, 0.0
    decay = 20  # ceil(0.2 * 100)
    assert all(wsd(s, total, warm, frac, lo) == 1.0 for s in range(warm, total - decay))
    first = total - decay
    assert wsd(first - 1, total, warm, frac, lo) == 1.0
    assert wsd(first, total, warm, frac, lo) == pytest.approx(1 - 1 / decay)  # first decay step moves
    assert wsd(total - 1, total, warm, frac, lo) == pytest.approx(lo)
    assert wsd(total + 7, total, warm, frac, lo) == pytest.approx(lo)
    for k in range(decay):
        assert wsd(first + k, total, warm, frac, 0.1) == pytest.approx(1 - 0.9 * (k + 1) / decay)


def test_wsd_edge_cases():
    assert [wsd(s, 10, 0, 0.0, 0.3) for s in range(10)] == [1.0] * 10  # decay_frac 0: constant
    assert wsd(0, 1, 0, 0.5, 0.0) == 0.0  # one step, all decay
    # warmup longer than the room left: the decay shrinks instead of overlapping the warmup
    assert [wsd(s, 6, 4, 0.9) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.5, 0.0])


def test_dispatch_and_unknown_schedule():
    assert lr_multiplier("wsd", 3, 10, 2, min_ratio=0.0, decay_frac=0.5) == wsd(3, 10, 2, 0.5, 0.0)
    assert lr_multiplier("cosine", 3, 10, 2, min_ratio=0.1, decay_frac=0.5) == warmup_cosine(3, 10, 2, 0.1)
    assert lr_multiplier("constant", 8, 10, 2, min_ratio=0.1, decay_frac=0.5) == 1.0
    with pytest.raises(UserError, match="schedule"):
        lr_multiplier("linear", 0, 10, 0, min_ratio=0.0, decay_frac=0.2)


def _tiny():
    cfg = ModelConfig.preset("tiny-moe").replace(vocab_size=128)
    return build_model(cfg, seed=0)


def test_param_groups_decay_matrices_only():
    model = _tiny()
    groups = param_groups(model.named_parameters(), 0.1)
    decay = {n for n, _ in groups[0]["params"]}
    no_decay = {n for n, _ in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    names = {n for n, _ in model.named_parameters()}
    assert decay | no_decay == names and not decay & no_decay
    assert "model.embed_tokens.weight" in decay
    assert "model.layers.0.mlp.experts.gate_up_proj" in decay  # stacked 3-D experts decay too
    assert all(n.endswith(".bias") or n.endswith("norm.weight") for n in no_decay)
    assert "model.layers.0.self_attn.q_proj.bias" in no_decay


def test_optimizer_matches_a_hand_built_torch_adamw_with_the_same_groups():
    """Our groups give the same update as per-parameter AdamW groups with explicit decays."""
    a, b = _tiny(), _tiny()
    opt = build_optimizer(a, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(
        [{"params": [p], "weight_decay": 0.1 if p.ndim >= 2 else 0.0} for p in b.parameters()],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    ids = torch.randint(0, 128, (2, 9))
    for _ in range(3):
        for m, o in ((a, opt), (b, ref)):
            m(ids).float().logsumexp(-1).mean().backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
