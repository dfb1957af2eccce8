"""The grouped MoE path against per-expert / per-token references, and the router losses.

References: a token-by-token loop over (token, slot) pairs written out with plain matmuls
(forward), the same loop under autograd (backward), and the per-expert `loop` backend.
Tolerance: fp32, rtol 1e-5 (atol 1e-6 for values near zero).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen25.config import ConfigError, ModelConfig
from qwen25.model.moe import (Experts, SparseMoE, expert_counts, grouped_mm, load_balancing_loss, route, router_loss,
                              router_z_loss, utilisation_entropy)

TOL = dict(rtol=1e-5, atol=1e-6)


def _experts(E: int, h: int, inter: int, backend: str, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(E, h, inter, backend=backend)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.3)
    torch.nn.init.normal_(ex.down_proj, std=0.3)
    return ex


def _per_token(ex: Experts, x, idx, w):
    """y[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]), one token and one slot at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gate, up = (ex.gate_up_proj[e] @ x[t]).chunk(2)
            acc = acc + w[t, j] * (ex.down_proj[e] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows)


# h=16, I=8 satisfy the grouped kernel's 16-byte stride rule in fp32; h=12, I=6 do not,
# so "auto" takes the padded bmm there.
SHAPES = [(6, 16, 8), (5, 12, 6)]


# The grouped kernel needs 16-byte aligned rows, so it is only asked for on the aligned shape.
CASES = [(b, *s) for s in SHAPES for b in ("auto", "grouped", "segment", "padded", "loop")
         if not (b == "grouped" and (s[1] % 4 or s[2] % 4))]


@pytest.mark.parametrize("backend,E,h,inter", CASES)
def test_experts_forward_and_backward_equal_the_per_token_reference(backend, E, h, inter):
    if backend == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, h, generator=g)
    logits = torch.randn(11, E, generator=g)
    logits[:, E - 1] = -30.0  # the last expert gets no token: an empty segment
    w, idx = route(logits, 2, renormalize=False)

    fast = _experts(E, h, inter, backend)
    slow = _experts(E, h, inter, "loop")
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    wf, ws = w.clone().requires_grad_(), w.clone().requires_grad_()
    yf = fast(xf, idx, wf)
    ys = _per_token(slow, xs, idx, ws)
    torch.testing.assert_close(yf, ys, **TOL)

    grad = torch.randn(yf.shape, generator=g)
    yf.backward(grad)
    ys.backward(grad)
    for a, b in [(xf.grad, xs.grad), (wf.grad, ws.grad), (fast.gate_up_proj.grad, slow.gate_up_proj.grad),
                 (fast.down_proj.grad, slow.down_proj.grad)]:
        torch.testing.assert_close(a, b, **TOL)
    assert torch.count_nonzero(fast.gate_up_proj.grad[E - 1]) == 0  # the unused expert learns nothing


@pytest.mark.parametrize("backend", ["padded", "grouped", "segment"])
def test_grouped_mm_matches_the_loop_with_several_empty_groups(backend):
    if backend == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([0, 5, 0, 0, 3, 1])
    x = torch.randn(int(counts.sum()), 8, generator=g)
    w = torch.randn(6, 8, 4, generator=g)
    torch.testing.assert_close(grouped_mm(x, w, counts, backend), grouped_mm(x, w, counts, "loop"), **TOL)
    empty = grouped_mm(x[:0], w, torch.zeros(6, dtype=torch.long), backend)
    assert empty.shape == (0, 4)


def test_sparse_moe_router_gradient_equals_the_reference_path():
    """Whole layer (router, routed experts, gated shared expert): the grouped path's
    gradients, the router's included, equal the per-expert loop's."""
    cfg = ModelConfig.preset("tiny-moe").replace(vocab_size=64, norm_topk_prob=True)
    layers = {}
    for backend in ("auto", "loop"):
        torch.manual_seed(0)
        layer = SparseMoE(cfg)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
        layer.experts.backend = backend
        layers[backend] = layer
    x = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    outs = {}
    for backend, layer in layers.items():
        y, logits = layer(x)
        (y.square().sum() + logits.sum()).backward()
        outs[backend] = y
    torch.testing.assert_close(outs["auto"], outs["loop"], **TOL)
    grads = {b: dict((n, p.grad) for n, p in layer.named_parameters()) for b, layer in layers.items()}
    for name, g in grads["auto"].items():
        # Router gradients sum many signed terms (entries near 0 next to entries ~350), so the
        # absolute tolerance is 1e-5 of the tensor's largest entry (both fp32 paths are equally
        # far from a float64 run, ~6e-7 of it).
        ref = grads["loop"][name]
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    assert grads["auto"]["gate.weight"].abs().sum() > 0  # the router is trained through the weights


def test_router_z_loss_equals_its_definition_and_respects_the_mask():
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(6, 5, generator=g) * 3 for _ in range(2)]
    mask = torch.tensor([1, 1, 0, 1, 0, 1.0])
    want, n = 0.0, 0
    for layer in logits:
        for t in range(6):
            if mask[t]:
                want += math.log(sum(math.exp(v) for v in layer[t].tolist())) ** 2
                n += 1
    torch.testing.assert_close(router_z_loss(logits, mask), torch.tensor(want / n), rtol=1e-6, atol=0)

    cfg = ModelConfig.preset("tiny-moe").replace(num_experts=5, router_aux_loss_coef=0.0, router_z_loss_coef=0.5)
    torch.testing.assert_close(router_loss(logits, cfg, mask), 0.5 * router_z_loss(logits, mask))


def test_router_z_loss_coef_round_trips_and_is_validated():
    cfg = ModelConfig.preset("tiny-moe").replace(router_z_loss_coef=1e-3)
    assert ModelConfig.from_hf(cfg.to_hf()).router_z_loss_coef == 1e-3
    assert "router_z_loss_coef" not in ModelConfig.preset("tiny-moe").to_hf()
    with pytest.raises(ConfigError, match="router_z_loss_coef"):
        ModelConfig.preset("tiny-moe").replace(router_z_loss_coef=-1.0)


def test_utilisation_entropy_of_even_and_collapsed_routing():
    assert utilisation_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(math.log(4))
    assert utilisation_entropy(torch.tensor([0, 9, 0, 0])) == 0.0
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    assert expert_counts(logits, 2).tolist() == [1, 1, 2]


def test_pretraining_loss_adds_the_router_z_loss_per_target_token():
    """lm_loss with router_z_loss_coef: summed CE + coef x z-loss x count, where both terms
    are recomputed here from a plain forward (F.cross_entropy, logsumexp of the router logits)."""
    from qwen25.model.model import build_model
    from qwen25.train.loop import lm_loss

    cfg = ModelConfig.preset("tiny-moe").replace(router_z_loss_coef=0.05)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    labels = ids.roll(-1, 1)
    labels[0, -3:] = -100  # masked targets count neither in the CE nor in the z-loss
    ce, count, aux = lm_loss(model, {"input_ids": ids, "labels": labels}, cfg)
    logits, router_logits = model(ids, output_router_logits=True)
    want_ce = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="sum")
    keep = (labels != -100).reshape(-1)
    z = sum(torch.logsumexp(r.float(), -1).square()[keep].sum() for r in router_logits) / (keep.sum() * len(router_logits))
    assert float(count) == keep.sum()
    torch.testing.assert_close(ce, want_ce + 0.05 * z * keep.sum(), rtol=1e-5, atol=1e-4)
    plain, _, _ = lm_loss(model, {"input_ids": ids, "labels": labels}, cfg.replace(router_z_loss_coef=0.0))
    assert float((ce - plain).detach()) > 1e-3  # the term is really there


@pytest.mark.parametrize("layout", ["in_out", "out_in_transposed"])
def test_segment_mm_forward_and_backward_equal_the_loop(layout):
    """The per-segment custom op, with weights given [G, in, out] or as the transposed view of
    [G, out, in] storage (what Experts passes), against the loop under autograd, empty
    segments included (their weight gradient is zero)."""
    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([3, 0, 4, 0, 2])
    x = torch.randn(int(counts.sum()), 8, generator=g)
    stored = torch.randn(5, 6, 8, generator=g) if layout == "out_in_transposed" else torch.randn(5, 8, 6, generator=g)
    grad = torch.randn(x.shape[0], 6, generator=g)
    results = {}
    for backend in ("segment", "loop"):
        xi, wi = x.clone().requires_grad_(), stored.clone().requires_grad_()
        w = wi.transpose(1, 2) if layout == "out_in_transposed" else wi
        y = grouped_mm(xi, w, counts, backend)
        y.backward(grad)
        results[backend] = (y, xi.grad, wi.grad)
    for a, b in zip(results["segment"], results["loop"]):
        torch.testing.assert_close(a, b, **TOL)
    w_grad = results["segment"][2]
    assert w_grad.is_contiguous() and torch.count_nonzero(w_grad[1]) == 0 and torch.count_nonzero(w_grad[3]) == 0


def test_row_blocks_cut_reduced_precision_cpu_segments_into_a_block_multiple_and_a_remainder():
    from qwen25.model.moe import _ROW_BLOCK, _row_blocks

    bf16, f32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)
    assert _row_blocks(5, 5, bf16) == [] and _row_blocks(5, 5, f32) == []
    assert _row_blocks(3, 3 + 2 * _ROW_BLOCK + 7, f32) == [slice(3, 3 + 2 * _ROW_BLOCK + 7)]  # fp32: whole
    assert _row_blocks(3, 3 + 2 * _ROW_BLOCK + 7, bf16) == [slice(3, 3 + 2 * _ROW_BLOCK),
                                                          slice(3 + 2 * _ROW_BLOCK, 3 + 2 * _ROW_BLOCK + 7)]
    assert _row_blocks(0, _ROW_BLOCK, bf16) == [slice(0, _ROW_BLOCK)]
    assert _row_blocks(10, 10 + _ROW_BLOCK - 1, bf16) == [slice(10, 10 + _ROW_BLOCK - 1)]


@pytest.mark.parametrize("layout", ["in_out", "out_in_transposed"])
def test_segment_mm_in_bf16_equals_an_fp32_loop_on_the_same_inputs(layout):
    """bf16 on CPU cuts each segment into row blocks (see `_row_blocks`): segments of a
    block multiple plus a remainder, exactly one block, under one block and empty ones,
    forward and both gradients, against the fp32 per-expert loop on the bf16 values.
    Tolerance: bf16 output rounding (rtol 2e-2, atol 2e-2 x the reference's scale)."""
    g = torch.Generator().manual_seed(7)
    counts = torch.tensor([70, 0, 31, 32, 5, 97])
    E = counts.numel()
    x = torch.randn(int(counts.sum()), 40, generator=g).bfloat16()
    stored = (torch.randn(E, 24, 40, generator=g) if layout == "out_in_transposed"
              else torch.randn(E, 40, 24, generator=g)).bfloat16()
    grad = torch.randn(x.shape[0], 24, generator=g).bfloat16()
    results = {}
    for backend, dtype in (("segment", torch.bfloat16), ("loop", torch.float32)):
        xi, wi = x.to(dtype).clone().requires_grad_(), stored.to(dtype).clone().requires_grad_()
        w = wi.transpose(1, 2) if layout == "out_in_transposed" else wi
        y = grouped_mm(xi, w, counts, backend)
        y.backward(grad.to(dtype))
        results[backend] = (y, xi.grad, wi.grad)
    for got, want in zip(results["segment"], results["loop"]):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    assert torch.count_nonzero(results["segment"][2][1]) == 0


@pytest.mark.slow
def test_compiled_moe_layer_is_one_graph_and_equals_the_reference():
    """torch.compile(fullgraph=True) traces the whole MoE layer (no host sync, no
    data-dependent shape), does not recompile when the routing changes, and its forward and
    gradients equal the per-expert loop's."""
    import torch._dynamo

    cfg = ModelConfig.preset("tiny-moe").replace(vocab_size=64)
    layers = {}
    for backend in ("auto", "loop"):
        torch.manual_seed(0)
        layer = SparseMoE(cfg)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
        layer.experts.backend = backend
        layers[backend] = layer
    torch._dynamo.reset()
    compiled = torch.compile(layers["auto"], fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (0, 1, 2):  # three different routings, one compilation
            x = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
            outs, grads = {}, {}
            for name, fn in (("compiled", compiled), ("loop", layers["loop"])):
                xi = x.clone().requires_grad_()
                y, logits = fn(xi)
                (y.square().sum() + logits.sum()).backward()
                outs[name], grads[name] = y, xi.grad
            torch.testing.assert_close(outs["compiled"], outs["loop"], **TOL)
            torch.testing.assert_close(grads["compiled"], grads["loop"], rtol=1e-5,
                                       atol=1e-5 * float(grads["loop"].abs().max()))
    for (name, p), q in zip(layers["auto"].named_parameters(), layers["loop"].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * float(q.grad.abs().max()),
                                   msg=lambda m: f"{name}: {m}")


def _per_layer_reference(router_logits, E, k, mask):
    """Switch/GShard balance loss of each layer, written out token by token, averaged."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.double(), -1)
        f, P, n = [0.0] * E, [0.0] * E, 0.0
        for t in range(logits.shape[0]):
            if not mask[t]:
                continue
            n += 1
            for e in torch.topk(probs[t], k).indices.tolist():
                f[e] += 1
            for e in range(E):
                P[e] += float(probs[t, e])
        losses.append(E * sum((f[e] / n) * (P[e] / n) for e in range(E)))
    return sum(losses) / len(losses)


def test_per_layer_balance_loss_equals_an_explicit_reference_and_sees_what_pooling_hides():
    """Two layers that each use only half of the experts, the other half each: pooled over
    the layers the assignments look even (the transformers loss is near its minimum
    top_k), per layer they are not."""
    E, k, N = 4, 2, 64
    g = torch.Generator().manual_seed(3)
    favour = [torch.tensor([6.0, 6.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 6.0, 6.0])]
    logits = [torch.randn(N, E, generator=g) * 0.1 + f for f in favour]
    mask = torch.ones(N, dtype=torch.bool)
    mask[-5:] = False  # padding positions count for nothing
    per_layer = load_balancing_loss(logits, E, k, mask, per_layer=True)
    assert abs(float(per_layer) - _per_layer_reference(logits, E, k, mask)) < 1e-5
    pooled = load_balancing_loss(logits, E, k, mask)
    assert abs(float(pooled) - k) < 0.05 and float(per_layer) > 1.9 * k
    # a balanced routing is at the minimum top_k either way
    even = [torch.zeros(N, E)]
    assert abs(float(load_balancing_loss(even, E, k, None, per_layer=True)) - k) < 1e-6


def test_per_layer_balance_is_a_training_setting_that_round_trips_and_is_type_checked():
    cfg = ModelConfig.preset("tiny-moe")
    assert "router_aux_loss_per_layer" not in cfg.to_hf()  # released configs stay as transformers writes them
    d = cfg.replace(router_aux_loss_per_layer=True).to_hf()
    assert ModelConfig.from_hf(d).router_aux_loss_per_layer is True
    with pytest.raises(ConfigError, match="router_aux_loss_per_layer"):
        ModelConfig.from_hf({**d, "router_aux_loss_per_layer": "yes"})
