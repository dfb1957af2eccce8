"""Loss functions against explicit slow implementations (float64 log-softmax by hand)."""

import math

import pytest
import torch

from qwen25.train.losses import IGNORE_INDEX, bits_per_byte, cross_entropy_sum, token_logprobs


def _reference_ce(logits, labels):
    """sum over labelled positions of -log softmax(logits)[label], in float64 by hand."""
    x = logits.double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    total, count = 0.0, 0
    for row, t in zip(x, y.tolist()):
        if t == IGNORE_INDEX:
            continue
        m = row.max()
        lse = m + torch.log(torch.exp(row - m).sum())
        total += float(lse - row[t])
        count += 1
    return total, count


def _batch(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    return logits, labels


def test_cross_entropy_sum_matches_explicit_log_softmax():
    logits, labels = _batch()
    total, count = cross_entropy_sum(logits, labels)
    ref_total, ref_count = _reference_ce(logits, labels)
    assert int(count) == ref_count == 18
    assert float(total) == pytest.approx(ref_total, rel=1e-6)
    assert total.dtype == torch.float32


def test_bf16_logits_are_upcast_before_the_log_softmax():
    logits, labels = _batch(1)
    total, _ = cross_entropy_sum(logits.bfloat16(), labels)
    ref, _ = _reference_ce(logits.bfloat16().float(), labels)  # same rounded inputs, exact math
    assert total.dtype == torch.float32
    assert float(total) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 100])
def test_chunked_equals_unchunked_in_value_and_gradient(chunk):
    logits, labels = _batch(2)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ta, ca = cross_entropy_sum(a, labels)
    tb, cb = cross_entropy_sum(b, labels, chunk_size=chunk)
    ta.backward()
    tb.backward()
    assert int(ca) == int(cb)
    torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_all_positions_ignored_gives_zero_loss_and_count():
    logits, labels = _batch(3)
    total, count = cross_entropy_sum(logits, torch.full_like(labels, IGNORE_INDEX))
    assert float(total) == 0.0 and int(count) == 0


def test_token_logprobs_match_explicit_softmax_and_zero_ignored():
    logits, labels = _batch(4)
    lp = token_logprobs(logits, labels)
    p = torch.softmax(logits.double(), -1)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            expect = 0.0 if y == IGNORE_INDEX else math.log(float(p[b, t, y]))
            assert float(lp[b, t]) == pytest.approx(expect, abs=1e-5)


def test_bits_per_byte_definition():
    # 1,000 tokens at ln(2) nats each over 500 bytes = 2 bits per byte
    assert bits_per_byte(1000 * math.log(2), 500) == pytest.approx(2.0)


@pytest.mark.parametrize("dtype, chunk", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 5)])
def test_compiled_loss_equals_the_float64_reference_in_value_and_gradient(dtype, chunk):
    """The torch.compile'd cross entropy (the trainer's `compile` option) against the
    float64 reference: value rtol 1e-5; gradient against float64 autograd, atol 1e-6."""
    logits, labels = _batch(5)
    logits = logits.to(dtype)
    x = logits.clone().requires_grad_()
    total, count = cross_entropy_sum(x, labels, chunk_size=chunk, compiled=True)
    total.backward()
    ref, ref_count = _reference_ce(logits.float(), labels)
    assert int(count) == ref_count and total.dtype == torch.float32
    assert float(total.detach()) == pytest.approx(ref, rel=1e-5)
    x64 = logits.double().requires_grad_()
    mask = labels != IGNORE_INDEX
    lp = torch.log_softmax(x64, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    (-(lp * mask).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad.to(x.grad.dtype).double(),
                               atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
