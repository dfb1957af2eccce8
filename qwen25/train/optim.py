"""AdamW with decoupled weight decay on matrices only, and learning-rate schedules.

The optimizer is `torch.optim.AdamW` itself (fused kernels where the parameters allow it);
this file only decides which parameters decay and what the learning rate is at each step.

Schedules are pure functions `step -> multiplier of the peak LR`, with `step` the 0-based
index of the optimizer step about to run and `total` the number of steps in the run:

- `warmup_cosine`: linear warmup to 1, then a half cosine down to `min_ratio` at the last
  step (Qwen-1 decayed to 10% of the peak; the Qwen2.5 report does not state its schedule).
- `wsd` (warmup-stable-decay): linear warmup, a long constant phase, then a linear decay
  to `min_ratio` over the last `decay_frac` of the run. Good for short runs and for runs
  whose length is not known in advance; MiniCPM and nanochat use it.
- `constant`: warmup, then 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from qwen25.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")


# --------------------------------------------------------------------------------------
# Parameter groups and the optimizer
# --------------------------------------------------------------------------------------


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]],
                 weight_decay: float) -> list[dict]:
    """Two AdamW groups: tensors with >= 2 dims decay; biases and norm scales do not.

    Decaying gains and biases only pulls them towards 0 (or the norm scales away from 1)
    without regularising anything, the usual choice since GPT-2 / nanoGPT. Embeddings and
    stacked MoE expert weights (3-D) decay like any matrix. Each group lists
    `(name, param)` pairs, so the optimizer's state dict names parameters by their
    fully-qualified names (what checkpoints key on).
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, weight_decay: float = 0.1,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over `param_groups(model)`.

    fused=None picks the fused kernel when every parameter is a plain tensor on CPU or
    CUDA (one kernel per step instead of a dozen per tensor); sharded (DTensor)
    parameters use the foreach path, which torch supports for them everywhere.
    """
    groups = param_groups(model.named_parameters(), weight_decay)
    if fused is None:
        params = [p for g in groups for _, p in g["params"]]
        fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused, foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------
# Schedules (pure functions)
# --------------------------------------------------------------------------------------


def _warmup(step: int, warmup: int) -> float | None:
    """Linear warmup: step 0 gets 1/warmup, step warmup-1 gets 1. None once warmed up."""
    if step < warmup:
        return (step + 1) / warmup
    return None


def warmup_cosine(step: int, total: int, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """1 at step `warmup`, `min_ratio` at step `total - 1` and after, half cosine between."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    span = total - 1 - warmup  # steps from the peak to the last step
    if span <= 0:  # warmup fills the run: there is no decay phase
        return 1.0 if step < total else min_ratio
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd(step: int, total: int, warmup: int = 0, decay_frac: float = 0.2,
        min_ratio: float = 0.0) -> float:
    """Warmup, then 1 until the last `ceil(decay_frac * total)` steps, which fall linearly.

    The decay reaches `min_ratio` exactly at the last step (`total - 1`); each decay step
    is a fraction (k + 1) / decay_steps of the way down, so the first one already moves.
    """
    w = _warmup(step, warmup)
    if w is not None:
        return w
    decay_steps = min(math.ceil(decay_frac * total), total - warmup)
    start = total - decay_steps
    if decay_steps <= 0 or step < start:
        return 1.0
    if step >= total - 1:
        return min_ratio
    k = step - start
    return 1.0 - (1.0 - min_ratio) * (k + 1) / decay_steps


def constant(step: int, total: int, warmup: int = 0) -> float:
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def lr_multiplier(schedule: str, step: int, total: int, warmup: int, *,
                  min_ratio: float, decay_frac: float) -> float:
    """Dispatch on the schedule's name (the config field `schedule`)."""
    if schedule == "cosine":
        return warmup_cosine(step, total, warmup, min_ratio)
    if schedule == "wsd":
        return wsd(step, total, warmup, decay_frac, min_ratio)
    if schedule == "constant":
        return constant(step, total, warmup)
    raise UserError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
