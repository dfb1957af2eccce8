"""The Online Merging Optimizer, OnDARE variant (Lu et al. 2024, arXiv 2405.17931; spec §5.2).

Qwen2.5 runs DPO with this optimizer to limit the "alignment tax": every step is a small
model merge between the policy's own Adam update and the task vector that SFT added to the
base model, so preference training keeps pulling towards what SFT learned.

Per parameter θ and step t (Adam moments m, v as in AdamW):

    Δ     = -lr · m̂ / (√v̂ + ε)                 the ordinary Adam update (bias-corrected)
    Δ'    = Δ ⊙ mask / p,  mask ~ Bernoulli(p)   DARE: drop and rescale (p = `keep`)
    Δ'   *= |Δ|₁ / (|Δ'|₁ + ε), clamp ±clip     only with `rescale` (keeps the L1 norm)
    θ    += α · τ_ref + (1 - α) · Δ'             merge with the reference task vector
    θ    -= lr · wd · θ                          decoupled weight decay, after the merge

τ_ref = clamp(DARE_p(θ_SFT - θ_base), ±clip) is computed once (`reference_task_vector`) and
stored as optimizer state, so it is checkpointed and resumed with the moments. Without a
task vector (no base model given) the update is DARE on Adam's step alone.

With `online_step` k > 1 the merge happens every k-th step: steps in between apply Δ as
plain AdamW and remember it; the k-th step takes those updates back, merges their sum with
the current Δ as above and applies the result. (The reference implementation returned from
`step()` after its first parameter on those in-between steps; here every parameter moves.)

Randomness: each dropout mask comes from its own generator seeded by (seed, step, parameter
index), never from the global RNG. Every data-parallel rank therefore draws the same mask
(replicas stay identical without a broadcast), and a resumed run draws exactly the masks
the uninterrupted run would have.

With keep = 1, α = 0 and no weight decay this is exactly `torch.optim.AdamW`'s update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from qwen25.errors import UserError

_SEED_STRIDE = 1_000_003  # a prime: (step, index) pairs map to distinct seeds for < 1M params


def dare_(delta: torch.Tensor, keep: float, generator: torch.Generator) -> torch.Tensor:
    """In place: zero each entry with probability 1 - keep, scale the survivors by 1/keep."""
    if keep >= 1.0:
        return delta
    mask = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < keep
    return delta.mul_(mask.to(delta.dtype)).div_(keep)


def mask_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of the dropout mask of parameter `index` at (1-based) step `step`."""
    return torch.Generator(device=device).manual_seed(seed + _SEED_STRIDE * step + index)


@torch.no_grad()
def reference_task_vector(sft: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], *,
                          keep: float, clip: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """τ_ref = clamp(DARE_keep(θ_SFT - θ_base), ±clip) per parameter name (float32).

    Masks are seeded per name position (sorted names), so τ_ref is reproducible."""
    missing = sorted(set(sft) - set(base))
    if missing:
        raise UserError(f"the merge base model lacks {missing[0]} (and {len(missing) - 1} more); "
                        "pass the pretrained model the SFT checkpoint was trained from")
    out = {}
    for i, name in enumerate(sorted(sft)):
        if sft[name].shape != base[name].shape:
            raise UserError(f"the merge base model's {name} has shape {tuple(base[name].shape)}, "
                            f"the SFT model's {tuple(sft[name].shape)}; use the matching base")
        d = sft[name].float() - base[name].float().to(sft[name].device)
        g = mask_generator(seed, 0, i, d.device)
        out[name] = dare_(d, keep, g).clamp_(-clip, clip)
    return out


class OnlineMergingAdamW(torch.optim.Optimizer):
    """AdamW whose update is sparsified (DARE) and merged with a task vector each step.

    params: tensors, or groups as `optim.param_groups` builds them (with `(name, param)`
    pairs: torch then records `param_names`, and `set_task_vector` matches by name).
    keep: DARE keep probability p of the update (spec's `reserve_p`; 1 = no dropout).
    alpha: weight of the task vector τ_ref in the merge (0 = never merge it).
    rescale / clip: restore the L1 norm of a sparsified update and clamp it to ±clip.
    online_step: merge every this many steps (1 = every step).
    seed: base seed of the dropout masks.
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, keep: float = 1.0, alpha: float = 0.0,
                 rescale: bool = False, clip: float = 1.0, online_step: int = 1, seed: int = 0):
        if not 0.0 < keep <= 1.0:
            raise UserError(f"merge keep probability must be in (0, 1] (got {keep})")
        if not 0.0 <= alpha < 1.0:
            raise UserError(f"merge alpha must be in [0, 1) (got {alpha})")
        if online_step < 1:
            raise UserError(f"online_step must be >= 1 (got {online_step})")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, keep=keep,
                        alpha=alpha, rescale=rescale, clip=clip, online_step=online_step, seed=seed)
        super().__init__(params, defaults)

    @torch.no_grad()
    def set_task_vector(self, tau: Mapping[str, torch.Tensor]) -> None:
        """Store τ_ref (from `reference_task_vector`) beside each parameter, by name."""
        for group in self.param_groups:
            names = group.get("param_names")
            if names is None:
                raise UserError("set_task_vector needs named parameters: build the optimizer "
                                "from (name, param) pairs")
            for name, p in zip(names, group["params"]):
                if name not in tau:
                    raise UserError(f"the task vector has no entry for {name}")
                if tau[name].shape != p.shape:
                    raise UserError(f"task vector {name} has shape {tuple(tau[name].shape)}, "
                                    f"the parameter {tuple(p.shape)}")
                self.state[p]["tau_ref"] = tau[name].to(device=p.device, dtype=torch.float32).clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                i, index = index, index + 1  # position over all groups: the mask's identity
                if p.grad is None:
                    continue
                self._update(p, p.grad, group, i)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, index: int) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["online_step"] > 1:
                state["cached_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = int(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Δ = -lr · m̂ / (√v̂ + ε), written as torch's AdamW does (same rounding).
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        delta = (m / denom).mul_(-lr / (1 - beta1 ** t))

        k = group["online_step"]
        if k > 1:
            cache = state["cached_delta"]
            if t % k:  # an in-between step: plain AdamW, remembered for the merge
                cache.add_(delta)
                p.add_(delta)
                if wd:
                    p.add_(p, alpha=-lr * wd)
                return
            p.sub_(cache)  # take the in-between updates back and merge them with this one
            delta.add_(cache)
            cache.zero_()

        before = delta.abs().sum() if group["rescale"] else None
        dare_(delta, group["keep"], mask_generator(group["seed"], t, index, p.device))
        if before is not None and float(before) >= 1e-8:
            delta.mul_(before / (delta.abs().sum() + eps)).clamp_(-group["clip"], group["clip"])
        tau = state.get("tau_ref")
        if tau is None:  # nothing to merge with: DARE on Adam's step alone
            p.add_(delta)
        else:
            p.add_(tau.to(p.dtype), alpha=group["alpha"]).add_(delta, alpha=1 - group["alpha"])
        if wd:
            p.add_(p, alpha=-lr * wd)
