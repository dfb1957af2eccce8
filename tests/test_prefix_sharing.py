"""A prefix shared by many prompts (few-shot examples) computed once gives the same results
as prefilling every prompt whole: multiple-choice log-likelihoods against one full forward
per request (`Engine.score`), and engine generation against the same engine without the
shared prefix. fp32, tolerance 1e-4 on summed log-probs (the tests' usual bound for
reordered float sums); greedy tokens must be identical."""

from __future__ import annotations

import random

import pytest

from qwen25 import Engine, load_model, load_tokenizer
from qwen25.errors import UserError
from qwen25.eval.backends import LocalBackend
from qwen25.eval.loglik import MIN_SHARED_PREFIX, loglikelihoods, shared_prefix
from serve_support import random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = random_checkpoint(tmp_path_factory.mktemp("prefix") / "tiny", max_position_embeddings=1024)
    return load_model(path), load_tokenizer(path)


def _shots(rng, n):
    return [rng.randrange(1000) for _ in range(n)]


def test_shared_prefix_leaves_every_sequence_a_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 9]]) == 3
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # one is a prefix of the other
    assert shared_prefix([[7, 1], [8, 1]]) == 0
    assert shared_prefix([[5]]) == 0 and shared_prefix([]) == 0


def _requests(seed=0):
    rng = random.Random(seed)
    shots = _shots(rng, 60)
    reqs = []
    for q in range(9):  # questions behind the same shots, 2-4 choices each
        ctx = shots + _shots(rng, rng.randint(1, 25))
        for _ in range(rng.randint(2, 4)):
            reqs.append((ctx, _shots(rng, rng.randint(1, 6))))
    reqs.append((shots[:MIN_SHARED_PREFIX + 3], [4, 5]))  # a context inside the others' prefix
    other = _shots(rng, 70)  # a second family of shots
    for _ in range(4):
        reqs.append((other + _shots(rng, rng.randint(1, 10)), _shots(rng, 3)))
    return reqs


@pytest.mark.parametrize("budget", [150, 100_000])  # several batches / one batch
def test_loglikelihoods_with_shared_shots_equal_full_forwards(tiny, budget):
    model, _ = tiny
    reqs = _requests()
    shared = loglikelihoods(model, reqs, token_budget=budget)
    plain = loglikelihoods(model, reqs, token_budget=budget, share_prefix=False)
    engine = Engine(model, max_batch_size=1, max_seq_len=256, hugepages=False)
    for (ctx, cont), a, b in zip(reqs, shared, plain):
        ref = engine.score(ctx, cont)
        assert abs(a.logprob - ref.total) < 1e-4, (a.logprob, ref.total)
        assert abs(b.logprob - ref.total) < 1e-4
        assert a.greedy == ref.is_greedy and a.tokens == len(cont)


def _generate(model, prompts, prefix=None, n=1, temperature=0.0, decode="auto", batch=4):
    engine = Engine(model, max_batch_size=batch, max_seq_len=256, prefill_chunk=32, decode=decode, hugepages=False)
    if prefix is not None:
        engine.share_prefix(prefix)
    outs = engine.generate(prompts, max_new_tokens=12, temperature=temperature, seed=3, logprobs=1, n=n)
    return [(c.tokens, list(c.logprobs)) for c in outs]


@pytest.mark.parametrize("decode", ["auto", "torch"])
def test_generation_after_a_shared_prefix_equals_a_full_prefill(tiny, decode):
    model, _ = tiny
    rng = random.Random(1)
    shots = _shots(rng, 75)  # crosses two prefill chunks of 32
    prompts = [shots + _shots(rng, rng.randint(1, 40)) for _ in range(5)]
    prompts.append(_shots(rng, 20))  # does not start with the prefix
    prompts.append(list(shots))  # is the prefix: nothing of its own to prefill, so not reused
    full = _generate(model, prompts, decode=decode)
    reused = _generate(model, prompts, prefix=shots, decode=decode)
    for (t1, l1), (t2, l2) in zip(full, reused):
        assert t1 == t2
        assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4


def test_shared_prefix_samples_and_neighbours(tiny):
    """n samples of one prompt reuse the prefix too, and a prompt's samples do not depend on
    which other prompts run beside it."""
    model, _ = tiny
    rng = random.Random(2)
    shots = _shots(rng, 50)
    prompts = [shots + _shots(rng, 7) for _ in range(3)]
    alone = _generate(model, prompts[:1], prefix=shots, n=2, temperature=1.0, batch=6)
    together = _generate(model, prompts, prefix=shots, n=2, temperature=1.0, batch=6)
    assert alone == together[:2]
    full = _generate(model, prompts[:1], n=2, temperature=1.0, batch=6)
    assert [t for t, _ in full] == [t for t, _ in alone]


def test_backend_generate_shares_the_prompts_prefix(tiny):
    model, tok = tiny
    shots = "".join(f"Question: what is {i} plus {i}?\nAnswer: {2 * i}\n\n" for i in range(6))
    prompts = [shots + f"Question: what is {q} plus 1?\nAnswer:" for q in (3, 11, 40)]
    on = LocalBackend(model, tok, batch_size=2).generate(prompts, ["\n\n"], 10)
    off = LocalBackend(model, tok, batch_size=2, share_prefix=False).generate(prompts, ["\n\n"], 10)
    assert on == off


def test_share_prefix_bad_input(tiny):
    model, _ = tiny
    engine = Engine(model, max_batch_size=1, max_seq_len=64, hugepages=False)
    with pytest.raises(UserError, match="empty prompt"):
        engine.share_prefix([])
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        engine.share_prefix([1, 10**9])
    with pytest.raises(UserError, match="max_seq_len"):
        engine.share_prefix(list(range(64)))
    engine.share_prefix([1, 2, 3])
    engine.share_prefix(None)  # forgets it
    assert engine.generate([[1, 2, 3, 4]], max_new_tokens=2, temperature=0.0)[0].tokens


def test_batches_keep_shot_families_apart_and_unrelated_contexts_together():
    """A batch whose contexts share shots is not diluted by another family (which would make
    it unshared); contexts that share nothing still batch together."""
    from qwen25.eval.loglik import _batches

    rng = random.Random(4)
    fam_a, fam_b = _shots(rng, 40), _shots(rng, 40)
    ctxs = sorted([tuple(fam_a + _shots(rng, 5)) for _ in range(3)] + [tuple(fam_b + _shots(rng, 5)) for _ in range(3)])
    groups = [(c, [i]) for i, c in enumerate(ctxs)]
    conts = [[1, 2]] * len(ctxs)
    sizes = [len(b) for b in _batches(groups, conts, 100_000, 64, share=True)]
    assert sizes == [3, 3]
    unrelated = sorted(tuple(_shots(rng, 50)) for _ in range(6))
    assert [len(b) for b in _batches([(c, [i]) for i, c in enumerate(unrelated)], conts, 100_000, 64, True)] == [6]
