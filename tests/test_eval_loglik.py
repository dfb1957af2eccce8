"""The shared-context log-likelihoods equal the engine's own scoring (one full forward per
request, `Engine.score`), whatever the batching: shared contexts, different contexts with
one continuation (WinoGrande), ragged lengths, several batches; and the chat path scores
the template's tokens."""

from __future__ import annotations

import random

import pytest

from qwen25 import Engine, load_model, load_tokenizer
from qwen25.eval.backends import LocalBackend
from qwen25.eval.harness import EvalConfig, _run_mc, run_task
from qwen25.eval.loglik import encode_pair, loglikelihoods
from qwen25.eval.tasks.base import MCExample
from serve_support import random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = random_checkpoint(tmp_path_factory.mktemp("ll") / "tiny", max_position_embeddings=1024)
    return path, load_model(path), load_tokenizer(path)


def _requests(seed=0):
    rng = random.Random(seed)
    reqs = []
    for _ in range(5):  # shared contexts with 2-4 choices each
        ctx = [rng.randrange(1000) for _ in range(rng.randint(3, 40))]
        for _ in range(rng.randint(2, 4)):
            reqs.append((ctx, [rng.randrange(1000) for _ in range(rng.randint(1, 6))]))
    cont = [rng.randrange(1000) for _ in range(4)]
    for _ in range(3):  # different contexts, one continuation
        reqs.append(([rng.randrange(1000) for _ in range(rng.randint(2, 30))], cont))
    return reqs


@pytest.mark.parametrize("budget", [64, 100_000])  # several batches / one batch
def test_loglikelihoods_equal_engine_score(tiny, budget):
    _, model, _ = tiny
    reqs = _requests()
    ours = loglikelihoods(model, reqs, token_budget=budget)
    engine = Engine(model, max_batch_size=1, max_seq_len=128, hugepages=False)
    for (ctx, cont), ll in zip(reqs, ours):
        ref = engine.score(ctx, cont)
        assert abs(ll.logprob - ref.total) < 1e-4, (ll.logprob, ref.total)
        assert ll.greedy == ref.is_greedy and ll.tokens == len(cont)


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny):
    _, _, tok = tiny
    ctx, cont = encode_pair(tok.encode, "Question: 2+2?\nAnswer: ", "4")
    assert ctx == tok.encode("Question: 2+2?\nAnswer:") and ctx + cont == tok.encode("Question: 2+2?\nAnswer: 4")


def test_chat_multiple_choice_scores_the_template_tokens(tiny):
    _, model, tok = tiny
    ex = MCExample("x", ("Question: Is fire hot?\nAnswer:",) * 2, (" yes", " no"), 0, (3, 2))
    rows: list[dict] = []
    _run_mc(LocalBackend(model, tok), None, [ex], True, rows)
    prompt = tok.apply_chat_template([{"role": "user", "content": ex.contexts[0]}], add_generation_prompt=True)
    engine = Engine(model, max_batch_size=1, max_seq_len=128, hugepages=False)
    for choice, ll in zip(("yes", "no"), rows[0]["logliks"]):
        whole = tok.encode(tok.apply_chat_template([{"role": "user", "content": ex.contexts[0]}],
                                                   add_generation_prompt=True, tokenize=False) + choice,
                           allow_special=True)
        assert whole[:len(prompt)] == prompt
        assert abs(ll - engine.score(prompt, whole[len(prompt):]).total) < 1e-4


def test_pass_at_k_from_several_samples(tiny, tmp_path):
    path, model, tok = tiny
    cfg = EvalConfig(tasks=("humaneval",), limit=2, samples=3, temperature=1.0, max_new_tokens=6, out=str(tmp_path))
    entry, rows = run_task(LocalBackend(model, tok, batch_size=6), "humaneval", cfg)
    assert len(rows) == 2 and all(len(r["completions"]) == 3 for r in rows)
    assert {"pass@1"} <= set(entry["metrics"]) and entry["metrics"]["pass@1"]["value"] == 0.0
