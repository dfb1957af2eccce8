"""Preference losses as pure functions: DPO (four variants) and Bradley-Terry.

DPO (Rafailov et al. 2023; spec §5.2) compares how much more the policy prefers the chosen
answer y_w over the rejected y_l than the frozen reference does. With sequence log-probs
summed over the *response* tokens only (the prompt is shared and cancels anyway, but its
tokens must not be counted in IPO's average):

    h = (log πθ(y_w|x) - log π_ref(y_w|x)) - (log πθ(y_l|x) - log π_ref(y_l|x))

and one loss per pair, with β the inverse temperature and ε the label smoothing:

    sigmoid  -(1-ε)·log σ(β h) - ε·log σ(-β h)        (ε = 0: plain DPO; ε > 0: cDPO)
    robust   (-(1-ε)·log σ(β h) + ε·log σ(-β h)) / (1 - 2ε)   (Chowdhury et al. 2024:
             unbiased under a label-flip rate ε)
    hinge    max(0, 1 - β h)                          (SLiC)
    ipo      (h - 1/(2β))²                            (Azar et al. 2023; h from log-ratios
             *averaged* per response token, as the IPO authors and TRL do)

The implicit rewards β·(log πθ - log π_ref) of each answer give the metrics every DPO
report shows: rewards/chosen, rewards/rejected, their margin and the fraction of pairs
whose chosen reward is higher (accuracy). The formulas and metric names follow TRL's
`DPOTrainer`, which users compare against (tests/test_dpo_loss.py checks equality).

Bradley-Terry (reward model, spec §5.3): -log σ(r_w - r_l - m) with an optional per-pair
margin m, plus `center` x (r_w + r_l)² to keep scores near zero (TRL's
`center_rewards_coefficient`, from Eisenstein et al. 2023).

Every loss returns per-pair values (float32 [B]); callers sum them and divide by the number
of pairs of the whole optimizer step (see losses.py for why sums, not means).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen25.errors import UserError
from qwen25.model.logprobs import token_logprobs
from qwen25.model.model import Transformer
from qwen25.train.losses import IGNORE_INDEX

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p(labels | prefix) over labelled positions, number of labelled positions), each [B].

    logits [B, T, V] (any float dtype; the log-softmax runs in float32), labels [B, T] already
    shifted (labels[b, t] follows input t), IGNORE_INDEX on the prompt and on padding. Through
    the package's one log-prob function (`qwen25.model.logprobs`), one row at a time: a
    float32 [T, V] copy per row instead of [B, T, V].
    """
    sums = [token_logprobs(logits[b], labels[b], 1.0).sum() for b in range(logits.shape[0])]
    return torch.stack(sums), (labels != IGNORE_INDEX).sum(-1)


def pair_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PairLogps:
    """Summed response log-probs of a `collate_pairs` batch ([2B, T]: chosen rows first) from
    one forward pass, with the response lengths (IPO's per-token average needs them).

    Our `Transformer` applies its lm_head to the response positions only (`logits_at`): the
    prompt's logits are never needed, and at a 150k vocabulary the head is a large share of
    the step. The call goes through the module given, so a DDP or FSDP2 wrapper's forward
    hooks run, and wrapped or not the numbers are the same (the reference log-probs are
    taken from the plain model, the policy's from the wrapped one: at step 0 they must tie
    exactly, as on one process). Other models (HF ones) give full logits."""
    labels = batch["labels"]
    if not isinstance(getattr(model, "module", model), Transformer):  # DDP keeps the model in .module
        logps, count = sequence_logprobs(model(batch["input_ids"]), labels)
    else:
        where = labels != IGNORE_INDEX
        lp = token_logprobs(model(batch["input_ids"], logits_at=where), labels[where], 1.0)  # [N] row-major
        rows = where.nonzero()[:, 0]
        logps = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
        count = where.sum(-1)
    chosen, rejected = logps.chunk(2)
    chosen_n, rejected_n = count.chunk(2)
    return PairLogps(chosen, rejected, chosen_n, rejected_n)


@dataclass(frozen=True)
class PairLogps:
    chosen: torch.Tensor  # [B] Σ log p over the chosen response tokens (float32)
    rejected: torch.Tensor  # [B] the same for the rejected responses
    chosen_tokens: torch.Tensor  # [B] int64 response lengths
    rejected_tokens: torch.Tensor


@dataclass(frozen=True)
class DPOOutput:
    losses: torch.Tensor  # [B] float32, one per pair
    chosen_rewards: torch.Tensor  # [B] β·(log πθ(y_w) - log π_ref(y_w)), summed log-probs, detached
    rejected_rewards: torch.Tensor  # [B] the same for y_l


def dpo_loss(policy: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> DPOOutput:
    """Per-pair DPO losses from the policy's summed log-probs and the reference's [B].

    The reference log-probs are constants (no gradient flows into them). IPO divides each
    log-ratio by its response length; the implicit rewards always use the sums (as TRL logs).
    """
    check_dpo_args(beta, loss_type, label_smoothing)
    chosen_ratio = policy.chosen.float() - ref_chosen.float().detach()
    rejected_ratio = policy.rejected.float() - ref_rejected.float().detach()
    eps = label_smoothing
    if loss_type == "ipo":
        h = (chosen_ratio / policy.chosen_tokens.clamp(min=1)
             - rejected_ratio / policy.rejected_tokens.clamp(min=1))
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        h = chosen_ratio - rejected_ratio
        if loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        else:  # hinge
            losses = torch.relu(1 - beta * h)
    return DPOOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in DPO_LOSSES:
        raise UserError(f"DPO loss {loss_type!r} is unknown; use one of {', '.join(DPO_LOSSES)}")
    if not beta > 0:
        raise UserError(f"DPO beta must be > 0 (got {beta}); 0.1 is the usual value")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"label smoothing must be in [0, 0.5) (got {label_smoothing}); it is the "
                        "assumed rate of flipped preference labels")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise UserError(f"label smoothing applies to the sigmoid and robust losses, not {loss_type!r}")


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       prefix: str = "rewards") -> dict[str, torch.Tensor]:
    """Sums over the pairs (divide by the pair count): chosen, rejected, margins, accuracies.

    Sums rather than means so that micro-batches and ranks add up exactly; `accuracies`
    counts pairs whose chosen reward is strictly higher (ties count as wrong, as in TRL).
    """
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {f"{prefix}/chosen": c.sum(), f"{prefix}/rejected": r.sum(),
            f"{prefix}/margins": (c - r).sum(), f"{prefix}/accuracies": (c > r).float().sum()}


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | None = None, center: float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss [B]: -log σ(r_w - r_l - margin) + center·(r_w + r_l)².

    margin [B] (optional): how much better y_w must score (e.g. from a graded label).
    center: coefficient of the reward-centring penalty (0 = off; TRL recommends 1e-2).
    """
    rw, rl = chosen_scores.float(), rejected_scores.float()
    diff = rw - rl if margin is None else rw - rl - margin.float()
    losses = -F.logsigmoid(diff)
    if center:
        losses = losses + center * (rw + rl) ** 2
    return losses
