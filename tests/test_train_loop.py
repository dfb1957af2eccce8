"""The shared optimizer step: accumulation, clipping, skipping, MoE aux loss, signals.

References: a plain full-batch loop written out here (mean CE over all tokens, backward,
`clip_grad_norm_`, `torch.optim.AdamW`), and the load-balancing loss added by hand.
"""

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from qwen25.config import ModelConfig
from qwen25.model.model import build_model
from qwen25.model.moe import load_balancing_loss
from qwen25.train.data import split_length_mix
from qwen25.train.loop import (SpikeGuard, StopFlag, TrainingDiverged, evaluate, lm_loss, train_step)
from qwen25.train.losses import IGNORE_INDEX
from qwen25.train.optim import build_optimizer
from qwen25.train.parallel import World

WORLD = World()
V = 96


def _model(preset="tiny", seed=0):
    return build_model(ModelConfig.preset(preset).replace(vocab_size=V), seed=seed)


def _batches(n, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (B, T + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, :3] = IGNORE_INDEX  # uneven target counts per micro-batch
        out.append({"input_ids": ids[:, :-1], "labels": labels,
                    "position_ids": torch.arange(T).expand(B, T)})
    return out


def _loss_fn(model, batch):
    return lm_loss(model, batch, model.config)


def test_accumulated_step_equals_full_batch_adamw_step():
    ours, ref = _model(), _model()
    opt = build_optimizer(ours, lr=3e-3, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(3):
        micro = _batches(3, seed=step)
        res = train_step(ours, opt, micro, _loss_fn, lr=3e-3, world=WORLD, grad_clip=0.5)
        # reference: one forward over the concatenated batch, mean over labelled tokens
        ids = torch.cat([b["input_ids"] for b in micro])
        labels = torch.cat([b["labels"] for b in micro])
        loss = F.cross_entropy(ref(ids).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
        assert res.skipped is None
        assert res.loss == pytest.approx(loss.item(), rel=1e-5)
        assert res.grad_norm == pytest.approx(float(norm), rel=1e-4)
        assert res.tokens == int((labels != IGNORE_INDEX).sum())
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=n)


def test_moe_step_adds_the_load_balancing_loss():
    ours, ref = _model("tiny-moe"), _model("tiny-moe")
    coef = 0.01
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    micro = _batches(1, seed=5)
    res = train_step(ours, opt, micro, _loss_fn, lr=0.1, world=WORLD, grad_clip=0.0, aux_coef=coef)
    b = micro[0]
    logits, router = ref(b["input_ids"], output_router_logits=True)
    ce = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX)
    aux = load_balancing_loss(router, 8, 2, b["labels"] != IGNORE_INDEX)
    (ce + coef * aux).backward()
    ref_opt.step()
    assert res.aux_loss == pytest.approx(aux.item(), rel=1e-5)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_nan_loss_skips_the_update_and_leaves_weights_and_moments_untouched():
    model = _model()
    opt = build_optimizer(model, lr=1e-3)
    guard = SpikeGuard()
    train_step(model, opt, _batches(1), _loss_fn, lr=1e-3, world=WORLD, guard=guard)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: v["exp_avg"].clone() for k, v in opt.state.items()}

    def poisoned(m, b):
        ce, n, aux = lm_loss(m, b, m.config)
        return ce * float("nan"), n, aux

    res = train_step(model, opt, _batches(1, seed=9), poisoned, lr=1e-3, world=WORLD, guard=guard)
    assert res.skipped and "non-finite" in res.skipped
    assert guard.total_skipped == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None  # gradients were dropped, not carried into the next step
    for k, v in opt.state.items():
        assert torch.equal(v["exp_avg"], moments[k])


def test_spike_guard_skips_loss_outliers_only_after_enough_history():
    g = SpikeGuard(window=25, z=6.0, min_history=20)
    for i in range(19):
        assert g.check(100.0 if i == 5 else 2.0 + 0.01 * (i % 3), 1.0) is None  # no history yet
    for i in range(30):
        assert g.check(2.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2)) is None
    reason = g.check(20.0, 1.0)
    assert reason and "loss spike" in reason
    assert g.check(2.0, 50.0) is None  # a large gradient norm is clipped, not skipped
    assert g.check(2.01, 1.0) is None and g.consecutive == 0
    assert len(g.losses) == 25 and max(g.losses) < 3  # bounded window: the early 100 fell out
    assert g.check(float("inf"), 1.0).startswith("non-finite loss")
    assert g.check(2.0, float("nan")).startswith("non-finite gradient")
    g.new_stage()  # a new stage may start at a very different loss
    assert g.check(9.0, 1.0) is None


def test_spike_guard_aborts_after_consecutive_skips_and_round_trips_its_state():
    g = SpikeGuard(max_consecutive=3)
    for _ in range(25):
        g.check(1.0, 1.0)
    clone = SpikeGuard(max_consecutive=3)
    clone.load_state_dict(g.state_dict())
    for guard in (g, clone):
        assert guard.check(float("nan"), 1.0) and guard.check(float("nan"), 1.0)
        with pytest.raises(TrainingDiverged, match="3 consecutive"):
            guard.check(float("nan"), 1.0)
    assert g.state_dict() == clone.state_dict()


def test_evaluate_is_the_mean_over_all_labelled_tokens():
    model = _model()
    batches = _batches(3, seed=3)
    r = evaluate(model, iter(batches), _loss_fn, WORLD)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    with torch.no_grad():
        ref = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert r["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert r["tokens"] == int((labels != IGNORE_INDEX).sum())


def test_length_mix_keeps_every_token_and_cuts_the_requested_share():
    micro = _batches(4, B=2, T=16, seed=1)  # 8 rows over the step
    out = split_length_mix(micro, 0.6, 4)  # round(0.6 * 8) = 5 rows cut into pieces of 4
    tokens = lambda bs, k: torch.cat([b[k].reshape(-1) for b in bs])  # noqa: E731
    assert torch.equal(tokens(out, "input_ids").sort().values, tokens(micro, "input_ids").sort().values)
    short = [b for b in out if b["input_ids"].shape[1] == 4]
    long = [b for b in out if b["input_ids"].shape[1] == 16]
    assert sum(b["input_ids"].shape[0] for b in short) == 5 * 4
    assert sum(b["input_ids"].shape[0] for b in long) == 3
    for b in short:
        assert torch.equal(b["position_ids"], torch.arange(4).expand(b["input_ids"].shape[0], 4))
        # each piece keeps its own next-token labels
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:]) or (b["labels"] == IGNORE_INDEX).any()
    assert split_length_mix(micro, 0.0, 4) == micro


def test_stop_flag_records_sigterm_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        assert not stop.agreed(WORLD)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        assert stop.agreed(WORLD)
    assert signal.getsignal(signal.SIGTERM) is before


def test_throughput_mfu_uses_the_flop_estimate():
    from qwen25.train.loop import Throughput, flops_per_token

    cfg = ModelConfig.preset("0.5B")
    fpt = flops_per_token(cfg, 4096)
    # 6N for the 494M-parameter model (tied embedding counted once, as the lm_head) + attention
    assert 6 * 0.49e9 < fpt < 6 * 0.5e9 + 12 * 24 * 14 * 64 * 4096 * 1.01
    meter = Throughput(fpt, peak_flops=1e12)
    meter.times.extend([1.0, 1.0])
    meter.tokens.extend([100, 300])
    assert meter.tokens_per_s == 200
    assert meter.mfu == pytest.approx(200 * fpt / 1e12)
    assert math.isclose(meter.eta_s(10), 10.0)


def test_activation_checkpointing_changes_memory_not_math():
    from qwen25.train.parallel import parallelize

    plain, ac = _model(), _model()
    ac = parallelize(ac, WORLD, activation_checkpointing=True)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ac.named_parameters()]  # names kept
    opts = [build_optimizer(m, lr=1e-3) for m in (plain, ac)]
    micro = _batches(2, seed=11)
    a = train_step(plain, opts[0], micro, _loss_fn, lr=1e-3, world=WORLD)
    b = train_step(ac, opts[1], micro, _loss_fn, lr=1e-3, world=WORLD)
    assert a.loss == b.loss and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)
    for p, q in zip(plain.parameters(), ac.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
