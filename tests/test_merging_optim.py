"""Online Merging Optimizer (OnDARE) against a slow, explicit float64 version of its formula
(spec §5.2), and against torch.optim.AdamW where the two must coincide."""

import copy
import math

import pytest
import torch

from qwen25.errors import UserError
from qwen25.train.merging_optim import OnlineMergingAdamW, mask_generator, reference_task_vector


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 5, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _grads(step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(4, 5, generator=g), torch.randn(7, generator=g)]


def _explicit(params, taus, steps, *, lr, betas, eps, wd, keep, alpha, rescale, clip, k, seed):
    """Element-by-element loops in float64: Adam moments, the DARE mask (the same uniform draws
    as the optimizer's contract: `mask_generator(seed, t, index)` then `torch.rand`), the L1
    rescale, the merge and weight decay; k-step merging rolls the cached updates back."""
    b1, b2 = betas
    theta = [[float(x) for x in p.detach().reshape(-1)] for p in params]
    m = [[0.0] * len(th) for th in theta]
    v = [[0.0] * len(th) for th in theta]
    cache = [[0.0] * len(th) for th in theta]
    for t in range(1, steps + 1):
        for i, grad in enumerate(_grads(t)):
            g = [float(x) for x in grad.reshape(-1)]
            n = len(g)
            delta = []
            for j in range(n):
                m[i][j] = b1 * m[i][j] + (1 - b1) * g[j]
                v[i][j] = b2 * v[i][j] + (1 - b2) * g[j] ** 2
                mhat, vhat = m[i][j] / (1 - b1 ** t), v[i][j] / (1 - b2 ** t)
                delta.append(-lr * mhat / (math.sqrt(vhat) + eps))
            if k > 1 and t % k:
                for j in range(n):
                    cache[i][j] += delta[j]
                    theta[i][j] += delta[j]
                    theta[i][j] -= lr * wd * theta[i][j]
                continue
            if k > 1:
                for j in range(n):
                    theta[i][j] -= cache[i][j]
                    delta[j] += cache[i][j]
                    cache[i][j] = 0.0
            u = torch.rand(n, generator=mask_generator(seed, t, i, torch.device("cpu"))).tolist()
            before = sum(abs(d) for d in delta)
            sparse = [d / keep if u[j] < keep else 0.0 for j, d in enumerate(delta)] if keep < 1 else delta
            if rescale and before >= 1e-8:
                after = sum(abs(d) for d in sparse)
                sparse = [max(-clip, min(clip, d * before / (after + eps))) for d in sparse]
            tau = [float(x) for x in taus[i].reshape(-1)] if taus is not None else None
            for j in range(n):
                if tau is None:
                    theta[i][j] += sparse[j]
                else:
                    theta[i][j] += alpha * tau[j] + (1 - alpha) * sparse[j]
                theta[i][j] -= lr * wd * theta[i][j]
    return [torch.tensor(th, dtype=torch.float64).reshape(p.shape) for th, p in zip(theta, params)]


def _run(opt, params, steps, start=1):
    for t in range(start, steps + 1):
        for p, g in zip(params, _grads(t)):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("keep,alpha,rescale,wd,k", [
    (0.5, 0.3, False, 0.0, 1),
    (0.3, 0.1, True, 0.1, 1),
    (0.7, 0.2, False, 0.05, 3),
    (1.0, 0.0, True, 0.0, 2),
])
def test_step_equals_the_explicit_formula(keep, alpha, rescale, wd, k):
    params = _params()
    start = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(p.shape, generator=g) * 0.01 for p in params]
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=wd, keep=keep, alpha=alpha,
              rescale=rescale, clip=1.0, k=k, seed=11)
    groups = [{"params": [("w", params[0]), ("b", params[1])]}]
    opt = OnlineMergingAdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=wd,
                             keep=keep, alpha=alpha, rescale=rescale, clip=1.0, online_step=k, seed=11)
    opt.set_task_vector({"w": taus[0], "b": taus[1]})
    _run(opt, params, 7)
    want = _explicit(start, taus, 7, **hp)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(params, start))


def test_without_task_vector_it_is_dare_on_adam_alone():
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = OnlineMergingAdamW(params, lr=0.01, betas=(0.9, 0.99), keep=0.5, seed=3)
    _run(opt, params, 4)
    want = _explicit(start, None, 4, lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.0, keep=0.5,
                     alpha=0.0, rescale=False, clip=1.0, k=1, seed=3)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_keep_one_alpha_zero_is_torch_adamw():
    a, b = _params(), _params()
    ours = OnlineMergingAdamW(a, lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(b, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False)
    _run(ours, a, 6)
    _run(ref, b, 6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_resume_from_state_dict_is_bitwise_identical():
    a = _params()
    tau = {"w": torch.full((4, 5), 0.01), "b": torch.full((7,), -0.01)}
    mk = lambda ps: OnlineMergingAdamW([{"params": [("w", ps[0]), ("b", ps[1])]}], lr=0.01, keep=0.4,
                                       alpha=0.2, online_step=2, weight_decay=0.1, seed=9)
    opt = mk(a)
    opt.set_task_vector(tau)
    _run(opt, a, 3)
    saved_params = [p.detach().clone() for p in a]
    saved_state = copy.deepcopy(opt.state_dict())
    _run(opt, a, 7, start=4)

    b = [torch.nn.Parameter(s.clone()) for s in saved_params]
    opt2 = mk(b)
    opt2.load_state_dict(saved_state)
    _run(opt2, b, 7, start=4)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_reference_task_vector_is_clamped_dare_of_the_difference():
    sft = {"a": torch.tensor([0.5, 3.0, -4.0, 0.1, 0.2, 0.3]), "b": torch.ones(3)}
    base = {"a": torch.zeros(6), "b": torch.zeros(3)}
    tau = reference_task_vector(sft, base, keep=0.5, clip=1.0, seed=2)
    for i, name in enumerate(sorted(sft)):
        u = torch.rand(sft[name].shape, generator=mask_generator(2, 0, i, torch.device("cpu")))
        want = torch.where(u < 0.5, (sft[name] - base[name]) / 0.5, torch.zeros(())).clamp(-1, 1)
        assert torch.equal(tau[name], want)
    with pytest.raises(UserError, match="lacks"):
        reference_task_vector(sft, {"a": torch.zeros(6)}, keep=1.0)


def test_bad_hyper_parameters_are_user_errors():
    with pytest.raises(UserError, match="keep"):
        OnlineMergingAdamW(_params(), keep=0.0)
    with pytest.raises(UserError, match="alpha"):
        OnlineMergingAdamW(_params(), alpha=1.0)
