"""GRPO math against a slow explicit implementation of the formulas (spec §5.4), written
with Python floats and loops over answers and tokens, so the tensor code is checked against
the formula itself and not against another vectorised copy."""

from __future__ import annotations

import math
import random

import pytest
import torch

from qwen25.train.grpo_loss import AGGREGATIONS, group_advantages, grpo_loss, k3_kl, order_by_reward_variance


def slow_advantages(rewards: list[list[float]], scale: bool, eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        out.append([(r - mean) / (std + eps) if scale else r - mean for r in group])
    return out


def slow_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation, max_length):
    """The objective written term by term: ℓ_t = −min(ρA, clip(ρ)A) + β(π_ref/π − log(π_ref/π) − 1)."""
    n, t_len = len(logp), len(logp[0])
    per_answer_sums, lengths = [], []
    for i in range(n):
        s, length = 0.0, 0
        for t in range(t_len):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            clipped_rho = min(max(rho, 1 - eps_low), 1 + eps_high)
            term = -min(rho * adv[i], clipped_rho * adv[i])
            if beta:
                q = math.exp(ref[i][t] - logp[i][t])
                term += beta * (q - math.log(q) - 1)
            s += term
            length += 1
        per_answer_sums.append(s)
        lengths.append(length)
    if aggregation == "token":
        return sum(per_answer_sums) / sum(lengths)
    if aggregation == "sequence":
        return sum(s / max(n_t, 1) for s, n_t in zip(per_answer_sums, lengths)) / n
    return sum(per_answer_sums) / (n * max_length)


def random_batch(seed: int, n: int = 6, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios 0.67..1.5
    ref = logp + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", range(3))
def test_loss_equals_the_formula(aggregation, beta, seed):
    logp, old, ref, adv, mask = random_batch(seed)
    out = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, beta=beta, ref_logp=ref,
                    aggregation=aggregation, max_length=12)
    ours = (out.loss_sum / out.normaliser).item()
    expected = slow_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                         0.2, 0.28, beta, aggregation, 12)
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_accumulated_micro_batches_equal_one_batch(aggregation):
    """Sum of loss sums / sum of normalisers over two halves == the loss of the whole batch
    (token and dr_grpo modes exactly; 'sequence' too, because it normalises by answers)."""
    logp, old, ref, adv, mask = random_batch(7, n=8)
    kw = dict(beta=0.02, ref_logp=None, aggregation=aggregation, max_length=9)
    whole = grpo_loss(logp, old, adv, mask, **{**kw, "ref_logp": ref})
    parts = [grpo_loss(logp[s], old[s], adv[s], mask[s], **{**kw, "ref_logp": ref[s]})
             for s in (slice(0, 3), slice(3, 8))]
    accumulated = sum(p.loss_sum for p in parts) / sum(p.normaliser for p in parts)
    assert accumulated.item() == pytest.approx((whole.loss_sum / whole.normaliser).item(), rel=1e-12)


def test_gradient_equals_the_formula_derivative():
    """d loss / d logp: where the unclipped term is taken, −A·ρ per counted token (token mode,
    β = 0, divided by the token count); where the clip is active, zero."""
    logp, old, _, adv, mask = random_batch(3)
    logp = logp.clone().requires_grad_(True)
    out = grpo_loss(logp, old, adv, mask, eps_low=0.1, eps_high=0.1, aggregation="token")
    (out.loss_sum / out.normaliser).backward()
    count = mask.sum().item()
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            active = mask[i, t].item() and not ((a > 0 and rho > 1.1) or (a < 0 and rho < 0.9))
            expected = -a * rho / count if active else 0.0
            assert logp.grad[i, t].item() == pytest.approx(expected, abs=1e-12)


def test_clip_edges():
    """At ρ exactly 1 ± ε nothing is clipped; just past the edge in the direction the
    advantage pushes, the clipped (constant) term is taken and the gradient vanishes; past the
    edge in the other direction the unclipped term still counts (the min is pessimistic)."""
    eps = 0.2
    old = torch.zeros(1, 4, dtype=torch.float64)
    rhos = torch.tensor([[1 + eps, 1 + eps + 1e-6, 1 - eps - 1e-6, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    for a, clipped_at in ((1.0, {1}), (-1.0, {2})):
        logp = torch.log(rhos).clone().requires_grad_(True)
        out = grpo_loss(logp, old, torch.tensor([a], dtype=torch.float64), mask, eps_low=eps, eps_high=eps)
        out.loss_sum.backward()
        zero = {t for t in range(4) if logp.grad[0, t].item() == 0.0}
        assert zero == clipped_at
        assert out.clipped_sum.item() == 1.0


def test_asymmetric_clip_ranges():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.25, 0.85]], dtype=torch.float64))
    mask = torch.ones(1, 2, dtype=torch.float64)
    # eps_high = 0.28 lets ρ = 1.25 through for A > 0; eps_low = 0.1 clips ρ = 0.85 for A < 0.
    pos = grpo_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask, eps_low=0.1, eps_high=0.28)
    neg = grpo_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), mask, eps_low=0.1, eps_high=0.28)
    assert pos.loss_sum.item() == pytest.approx(-(1.25 + 0.85))
    assert neg.loss_sum.item() == pytest.approx(1.25 + 0.9)  # 0.85 clipped up to 1 − 0.1


def test_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    a, b = -torch.rand(1000, generator=g) * 5, -torch.rand(1000, generator=g) * 5
    kl = k3_kl(a, b)
    assert (kl >= 0).all()
    assert k3_kl(a, a).abs().max().item() == 0.0
    for x, y, v in zip(a[:20].tolist(), b[:20].tolist(), kl[:20].tolist()):
        assert v == pytest.approx(math.exp(y - x) - (y - x) - 1, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages(scale):
    rng = random.Random(0)
    rewards = [[rng.choice([0.0, 1.0, 0.5]) for _ in range(8)] for _ in range(5)] + [[1.0] * 8]
    ours = group_advantages(torch.tensor(rewards), scale=scale, eps=1e-4)
    for row, expected in zip(ours.tolist(), slow_advantages(rewards, scale, 1e-4)):
        assert row == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ours[-1].abs().max().item() == 0.0  # an all-equal group teaches nothing


def test_beta_needs_a_reference_and_unknown_mode_is_refused():
    logp, old, _, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, adv, mask, aggregation="mean")


def test_order_by_reward_variance_on_a_known_pool():
    pool = [
        [1, 1, 1, 1],  # 0: variance 0 -> dropped
        [0, 1, 0, 1],  # 1: 0.25 (the maximum for 0/1 rewards)
        [0, 0, 0, 1],  # 2: 0.1875
        [0, 0, 0, 0],  # 3: dropped
        [1, 0, 1, 0],  # 4: 0.25, ties with 1 and stays after it
        [0.5, 0.5, 0.6, 0.5],  # 5: small but not zero
    ]
    sel = order_by_reward_variance(pool)
    assert sel.order == [1, 4, 2, 5]
    assert sel.dropped == [0, 3]
    assert sel.variances[2] == pytest.approx(0.1875)
    with pytest.raises(ValueError, match="at least 2"):
        order_by_reward_variance([[1.0]])
