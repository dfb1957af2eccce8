"""GRPO's math as pure functions of tensors (spec §5.4; DeepSeekMath §4.1).

For a query q, G answers o_1..o_G are sampled from the rollout policy π_old and scored
r_1..r_G. Every token of answer i gets the same group-normalised advantage

    A_i = (r_i − mean(r)) / (std(r) + eps)        (or without the std division)

and the policy maximises the clipped surrogate with a k3 KL penalty to a reference π_ref:

    ρ_t = πθ(o_t) / π_old(o_t)
    ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_i) + β · KL_t
    KL_t = π_ref/πθ − log(π_ref/πθ) − 1           (Schulman's k3: unbiased, ≥ 0)

How the per-token losses ℓ_t become one number is the main difference between published
variants, and it decides how gradient accumulation behaves. Each mode here returns a *sum*
with its normaliser beside it, like every loss of `losses.py`; the trainer divides the sum
of all micro-batches by the sum of their normalisers, so an accumulated step equals one big
batch in every mode:

- "token":    Σ_t ℓ_t over all answer tokens / number of answer tokens (DAPO, TRL's default);
- "sequence": Σ_i (mean_t ℓ_t of answer i) / number of answers (the original GRPO 1/|o_i|);
- "dr_grpo":  Σ_t ℓ_t / (number of answers × max answer length), a constant that does not
              depend on the lengths sampled (Dr. GRPO, Liu et al. 2025).

The variance-ordered query selection of the report (queries whose answers' rewards vary
most are trained on first; zero-variance groups teach nothing and are dropped) is
`order_by_reward_variance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

AGGREGATIONS = ("token", "sequence", "dr_grpo")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages [Q, G] from rewards [Q, G] (one row per query, one column per answer).

    The mean of each group is subtracted; with `scale`, the result is divided by the
    group's standard deviation (population std, as DeepSeekMath and TRL use) plus `eps`, so
    a group whose rewards are all equal gets advantage 0, not a division by zero.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [queries, group], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(πθ || π_ref) from log-probs of the sampled tokens (≥ 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


@dataclass(frozen=True)
class GRPOLoss:
    """What `grpo_loss` returns: the loss sum and its normaliser, plus per-step statistics
    (detached, summed over the counted tokens; divide by `tokens` for means)."""

    loss_sum: torch.Tensor  # scalar (fp32, or fp64 for fp64 inputs), differentiable
    normaliser: torch.Tensor  # same dtype: tokens, answers, or answers x max length
    tokens: torch.Tensor  # int64 scalar: answer tokens counted
    clipped_sum: torch.Tensor  # tokens where the clipped term was the one taken
    kl_sum: torch.Tensor  # Σ KL_t (0 when no reference)
    ratio_dev_sum: torch.Tensor  # Σ |ρ_t − 1|


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None, aggregation: str = "token",
              max_length: int | None = None) -> GRPOLoss:
    """The clipped GRPO objective (as a loss to minimise) over a batch of answers.

    logp [N, T]: log πθ of each answer's sampled tokens (differentiable); old_logp [N, T]:
    the same under the policy that sampled them (the rollout's log-probs; equal to logp's
    values on the first update); advantages [N] per answer; mask [N, T] 1 on answer tokens.
    ref_logp [N, T] is needed when beta > 0. max_length is the answer-length cap that
    "dr_grpo" divides by (default: T).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} must be one of {AGGREGATIONS}")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(-1)  # [N, 1]: the same for every token
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    per_token = per_token * mask
    tokens = mask.sum()
    answers = logp.shape[0]
    dtype = torch.promote_types(logp.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
    if aggregation == "token":
        loss_sum, normaliser = per_token.sum(), tokens
    elif aggregation == "sequence":
        lengths = mask.sum(dim=1).clamp(min=1.0)
        loss_sum, normaliser = (per_token.sum(dim=1) / lengths).sum(), torch.tensor(float(answers), dtype=dtype)
    else:
        loss_sum = per_token.sum()
        normaliser = torch.tensor(float(answers * (max_length or logp.shape[1])), dtype=dtype)
    with torch.no_grad():
        took_clip = (clipped < unclipped) & (mask > 0)  # min() chose the clipped term
        stats = dict(tokens=tokens.detach().long(), clipped_sum=took_clip.sum().float(),
                     kl_sum=(kl * mask).sum().float(), ratio_dev_sum=((ratio - 1).abs() * mask).sum().float())
    return GRPOLoss(loss_sum.to(dtype), normaliser.to(dtype), **stats)


@dataclass(frozen=True)
class Selection:
    """The outcome of `order_by_reward_variance`."""

    order: list[int]  # kept query indices, highest reward variance first
    dropped: list[int]  # queries whose answers all scored the same (variance <= min_variance)
    variances: list[float]  # per query of the pool, in pool order


def order_by_reward_variance(group_rewards: Sequence[Sequence[float]], min_variance: float = 1e-12) -> Selection:
    """Order a pool of queries by the variance of their sampled answers' rewards.

    group_rewards[q] are the rewards of a small group of answers to query q (from a cheap
    scoring pass). The report processes high-variance queries first; groups with no
    variance give every answer advantage 0, so they are dropped (and the caller refills the
    batch from the pool). Ties keep pool order, so the result is deterministic.
    """
    variances = []
    for q, rewards in enumerate(group_rewards):
        if len(rewards) < 2:
            raise ValueError(f"query {q} has {len(rewards)} scored answers; the variance needs at least 2")
        variances.append(float(torch.tensor(list(rewards), dtype=torch.float64).var(unbiased=False)))
    kept = [q for q, v in enumerate(variances) if v > min_variance]
    dropped = [q for q, v in enumerate(variances) if v <= min_variance]
    kept.sort(key=lambda q: -variances[q])  # sort is stable: ties stay in pool order
    return Selection(kept, dropped, variances)
