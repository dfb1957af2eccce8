"""Sampling functions against transformers' logits processors and slow explicit loops.

Tolerances: filters must keep exactly the same token set as the reference (distributions
are built without ties at the decision boundary); probabilities agree to 1e-6.
"""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen25.engine import sampling as S
from qwen25.model.logprobs import token_logprobs, top_logprobs
from qwen25.errors import UserError

NO_IDS = torch.zeros(1, 0, dtype=torch.long)  # the warpers ignore input_ids


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def hf_pipeline(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    x = logits[None].clone()
    if temperature != 1.0:
        x = TemperatureLogitsWarper(temperature)(NO_IDS, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(NO_IDS, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(NO_IDS, x)
    if min_p:
        x = MinPLogitsWarper(min_p)(NO_IDS, x)
    return x[0]


def distinct_logits(V: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * spread


# ---- hand-made distributions ----------------------------------------------------------

def test_top_k_on_hand_made_logits():
    logits = torch.tensor([1.0, 4.0, 3.0, -2.0, 0.5])
    assert kept(S.top_k_filter(logits, 2)) == {1, 2}
    assert kept(S.top_k_filter(logits, 1)) == {1}
    assert kept(S.top_k_filter(logits, 0)) == set(range(5))  # 0 = off
    assert kept(S.top_k_filter(logits, 99)) == set(range(5))  # larger than the vocabulary
    tied = torch.tensor([2.0, 1.0, 2.0, 2.0, 0.0])
    assert kept(S.top_k_filter(tied, 2)) == {0, 2, 3}  # ties with the k-th stay (as HF)
    assert kept(TopKLogitsWarper(2)(NO_IDS, tied[None])[0]) == {0, 2, 3}


def test_top_p_on_hand_made_probabilities():
    probs = torch.tensor([0.05, 0.5, 0.25, 0.15, 0.05])
    logits = probs.log()
    # sorted: 0.5, 0.25, 0.15, 0.05, 0.05; mass before each: 0, .5, .75, .9, .95
    assert kept(S.top_p_filter(logits, 0.4)) == {1}
    assert kept(S.top_p_filter(logits, 0.6)) == {1, 2}
    assert kept(S.top_p_filter(logits, 0.8)) == {1, 2, 3}
    assert kept(S.top_p_filter(logits, 1.0)) == set(range(5))  # 1 = off
    assert kept(S.top_p_filter(logits, 1e-9)) == {1}  # the top token always stays
    for p in (0.4, 0.6, 0.8):
        assert kept(S.top_p_filter(logits, p)) == kept(TopPLogitsWarper(p)(NO_IDS, logits[None])[0])


def test_min_p_on_hand_made_probabilities():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()
    assert kept(S.min_p_filter(logits, 0.45)) == {0, 1, 2}  # p >= 0.18
    assert kept(S.min_p_filter(logits, 0.8)) == {0}
    assert kept(S.min_p_filter(logits, 0.0)) == set(range(4))
    assert kept(S.min_p_filter(logits, 0.45)) == kept(MinPLogitsWarper(0.45)(NO_IDS, logits[None])[0])


def test_repetition_penalty_matches_hf_on_signed_logits():
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 3.0]])
    history = torch.tensor([[0, 1, 1, 3]])
    seen = torch.zeros(1, 5, dtype=torch.bool)
    seen[0, history[0]] = True
    ours = S.repetition_penalty(logits, seen, 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(ours, ref)
    assert ours[0, 0] == pytest.approx(2.0 / 1.3) and ours[0, 1] == pytest.approx(-2.6)
    assert ours[0, 2] == 0.5 and ours[0, 4] == 3.0  # unseen tokens untouched


def test_presence_and_frequency_penalties_match_openai_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, generator=g)
    generated = [[3, 3, 5], [0]]
    counts = torch.zeros(2, 7, dtype=torch.int32)
    for r, toks in enumerate(generated):
        for t in toks:
            counts[r, t] += 1
    ours = S.presence_frequency_penalty(logits, counts, 0.7, 0.4)
    ref = logits.clone()  # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    for r, toks in enumerate(generated):
        for j in set(toks):
            c = toks.count(j)
            ref[r, j] -= c * 0.4 + 0.7
    torch.testing.assert_close(ours, ref)


def test_temperature_zero_is_greedy_argmax_of_penalised_logits():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    params = S.SamplingParams(temperature=0.0, top_k=1, top_p=0.1)
    assert S.sample_row(logits, params, None) == 1
    seen = torch.tensor([False, True, False, False])
    params = S.SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert S.sample_row(logits, params, None, seen=seen) == 2  # 3.0 / 1.2 < 2.9


# ---- the fast candidate path equals the whole-vocabulary pipeline ---------------------

@pytest.mark.parametrize("cfg", [
    dict(top_k=40), dict(top_p=0.9), dict(top_p=0.5, temperature=0.7), dict(min_p=0.1),
    dict(top_k=100, top_p=0.8, min_p=0.05, temperature=1.3), dict(top_k=1), dict(top_k=10**6),
    dict(top_p=1.0), dict(),
])
def test_candidates_equal_hf_pipeline(cfg):
    V = 5000
    for seed in range(3):
        logits = distinct_logits(V, seed)
        t = cfg.get("temperature", 1.0)
        ref = hf_pipeline(logits, t, cfg.get("top_k", 0), cfg.get("top_p", 1.0), cfg.get("min_p", 0.0))
        ids, probs = S.candidates(logits / t, cfg.get("top_k", 0), cfg.get("top_p", 1.0), cfg.get("min_p", 0.0))
        assert set(ids.tolist()) == kept(ref)
        torch.testing.assert_close(probs, ref.softmax(-1)[ids], atol=1e-6, rtol=1e-5)
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_top_p_wider_than_the_candidate_window_falls_back_to_a_full_sort():
    V = 20000
    logits = distinct_logits(V, 7, spread=0.01)  # nearly flat: the nucleus has ~18000 tokens
    ids, _ = S.candidates(logits, top_p=0.9)
    assert len(ids) > S.TOP_P_CANDIDATES
    assert set(ids.tolist()) == kept(TopPLogitsWarper(0.9)(NO_IDS, logits[None])[0])


# ---- randomness -------------------------------------------------------------------------

def test_sampling_is_reproducible_and_follows_the_probabilities():
    ids = torch.tensor([10, 20, 30])
    probs = torch.tensor([0.5, 0.3, 0.2])
    draw = lambda seed, k: [S.sample(ids, probs, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(k)]
    assert draw(1, 50) == draw(1, 50)
    assert draw(1, 50) != draw(2, 50)
    many = draw(3, 20000)
    for i, p in zip((10, 20, 30), (0.5, 0.3, 0.2)):
        assert many.count(i) / len(many) == pytest.approx(p, abs=0.02)


def test_draw_across_blocks_follows_the_probabilities_and_skips_zeros():
    # tokens on both sides of a block edge (1023 | 1024) and the vocabulary's last token,
    # which sits in a zero-padded block; every other token has probability 0
    V = 3000
    probs = torch.zeros(V)
    want = {5: 0.2, 1023: 0.3, 1024: 0.1, V - 1: 0.4}
    for i, p in want.items():
        probs[i] = p
    g = torch.Generator().manual_seed(0)
    many = [S.inverse_cdf_draw(probs, g) for _ in range(20000)]
    assert set(many) <= set(want)
    for i, p in want.items():
        assert many.count(i) / len(many) == pytest.approx(p, abs=0.015)  # 3 sigma at n=20000 is 0.011


def test_draw_matches_multinomial_on_a_full_vocabulary():
    # the same distribution drawn by torch.multinomial (the reference) and by ours: the
    # frequencies of the 8 likeliest tokens and of "any other token" agree within 3 sigma
    torch.manual_seed(0)
    probs = (torch.randn(151936) * 3).softmax(-1)
    n = 20000
    ours = torch.tensor([S.inverse_cdf_draw(probs, g) for g in [torch.Generator().manual_seed(1)] for _ in range(n)])
    ref = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(2))
    for tok in probs.topk(8).indices.tolist() + [None]:
        f = (lambda x: (x == tok).float().mean()) if tok is not None else \
            (lambda x: (~torch.isin(x, probs.topk(8).indices)).float().mean())
        p = float(f(ref))
        assert abs(float(f(ours)) - p) <= 3 * math.sqrt(2 * max(p, 1e-4) * (1 - p) / n) + 1e-3


def test_batched_draws_equal_row_by_row_draws():
    # a decode step draws its plain-sampling rows together; each row must get the token it
    # would get alone (same generator state), whatever the other rows are
    torch.manual_seed(0)
    logits = torch.randn(6, 5000) * 4
    temps = [1.0, 0.7, 1.3, 1.0, 0.5, 2.0]
    alone = [S.sample_row(logits[r], S.SamplingParams(temperature=t), torch.Generator().manual_seed(r))
             for r, t in enumerate(temps)]
    together = S.sample_plain_rows(logits, temps, [torch.Generator().manual_seed(r) for r in range(6)])
    assert together == alone
    # and the batched draw follows softmax(logits / T): reference torch.multinomial frequencies
    row = logits[1] / 0.7
    gens = [torch.Generator().manual_seed(100 + k) for k in range(3000)]
    drawn = torch.tensor(S.sample_plain_rows(logits[1:2].expand(3000, -1).contiguous(), [0.7] * 3000, gens))
    ref = torch.multinomial(row.softmax(-1), 3000, replacement=True, generator=torch.Generator().manual_seed(1))
    for tok in row.topk(3).indices.tolist():
        p = float((ref == tok).float().mean())
        assert abs(float((drawn == tok).float().mean()) - p) <= 3 * math.sqrt(2 * p * (1 - p) / 3000) + 1e-3


def test_token_logprobs_are_log_softmax():
    logits = distinct_logits(50, 1)[None].repeat(2, 1)
    tokens = torch.tensor([3, 7])
    chosen, (vals, top_ids) = token_logprobs(logits, tokens, 1.0), top_logprobs(logits, 4, 1.0)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, ref[[0, 1], tokens])
    torch.testing.assert_close(vals, ref.topk(4, dim=-1).values)
    assert math.isclose(vals[0, 0].item(), ref[0].max().item(), rel_tol=1e-6)


# ---- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1.5),
    dict(repetition_penalty=0.0), dict(presence_penalty=3.0), dict(frequency_penalty=-2.5),
    dict(logprobs=21), dict(n=0), dict(max_new_tokens=0), dict(stop_token_ids=(5, 1000)),
    dict(temperature=float("nan")), dict(seed="7"),
])
def test_bad_parameters_raise_user_errors(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        S.SamplingParams(**bad).validate(vocab_size=1000)


# ---- issue 21 item 14: non-finite logits are named, not a multinomial RuntimeError -------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_probabilities_raise_a_clear_error(bad):
    logits = torch.randn(50)
    logits[7] = bad
    if bad == -math.inf:
        logits[:] = -math.inf  # every token impossible: softmax is NaN everywhere
    ids, probs = torch.arange(50), logits.softmax(-1)
    with pytest.raises(S.NonFiniteLogits, match="non-finite logits"):
        S.sample(ids, probs, torch.Generator().manual_seed(0))


def test_nan_weights_end_generation_with_one_line(tmp_path):
    import subprocess
    import sys

    import qwen25
    from qwen25.checkpoint import save_model

    model = qwen25.build_model(qwen25.ModelConfig.preset("tiny"), seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    eng = qwen25.Engine(model, max_batch_size=1, max_seq_len=32)
    with pytest.raises(S.NonFiniteLogits, match="non-finite logits"):
        eng.generate([[1, 2, 3]], max_new_tokens=2, temperature=1.0, seed=0)
    path = save_model(model, tmp_path / "nan")
    r = subprocess.run([sys.executable, "-m", "qwen25", "generate", str(path), "--tokenizer", "qwen2.5",
                        "--prompt", "Hello", "--temperature", "1", "--max-new-tokens", "2", "--seed", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "non-finite logits" in r.stderr
