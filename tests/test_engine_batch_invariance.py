"""A request's tokens and log-probabilities do not depend on what else is in the engine.

The server promises that a temperature-0 request gives the same answer alone or among 16
concurrent clients (llama.cpp's `test_consistent_result_different_batch_size`). Two things
could break it: the decode kernels accumulating differently by batch size, and the prompt
being prefilled in pieces that depend on the other queued prompts (different pieces give
K/V values that differ in the last bits). Reference: each prompt run alone in a fresh
engine. Tolerance: bitwise on the C++ decoder; 1e-5 on the PyTorch decode path, whose
matmuls may pick other kernels by batch size (it is documented as not bitwise invariant).
A third: another row's sampling parameters (issue 21 item 1), which must neither change a
greedy neighbour's output nor fail the step they share.
"""

import random

import pytest
import torch

from qwen25 import Engine, ModelConfig, build_model

VOCAB = 512


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny").replace(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    return build_model(cfg, seed=3)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 41))] for _ in range(count)]


def _engine(model, path: str) -> Engine:
    return Engine(model, max_batch_size=8, max_seq_len=96, prefill_chunk=16, decode=path, hugepages=False)


@pytest.mark.parametrize("path", ["portable", "auto"])
def test_tokens_and_logprobs_do_not_depend_on_the_batch(model, path):
    prompts = _prompts(10)
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=[], logprobs=3)
    alone = [_engine(model, path).generate([p], **kw)[0] for p in prompts]
    engine = _engine(model, path)
    # some requests arrive while others are prefilling or decoding
    early = [engine.add(p, **kw) for p in prompts[:6]]
    for _ in range(3):
        engine.step()
    late = [engine.add(p, **kw) for p in prompts[6:]]
    while engine.has_work:
        engine.step()
    together = [r.outputs[0] for r in early + late]
    exact = engine.decode_path != "torch"
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens
        if exact:
            assert a.logprobs == b.logprobs
            assert a.top_logprobs == b.top_logprobs
        else:
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_prefill_pieces_start_at_multiples_of_the_chunk(model, monkeypatch):
    """A prompt queued behind another is cut at 16, 32, ... of its own tokens, not where the
    earlier prompt left the step's budget."""
    engine = _engine(model, "portable")
    pieces: dict[int, list[int]] = {}  # prompt (by its fill token) -> piece lengths
    prefill = engine.runner.prefill

    def spy(slot, ids, want_logits):
        pieces.setdefault(ids[0], []).append(len(ids))
        return prefill(slot, ids, want_logits)

    monkeypatch.setattr(engine.runner, "prefill", spy)
    engine.generate([[5] * 10, [7] * 37, [9] * 16], max_new_tokens=2, temperature=0, stop_token_ids=[])
    assert pieces == {5: [10], 7: [16, 16, 5], 9: [16]}


# Sampling values at the edges of their valid ranges (issue 21 item 1): each is applied to its
# own row only, so a greedy neighbour in the same decode batch must get exactly its tokens
# and log-probabilities of running alone, and the hostile request itself must finish.
HOSTILE = [
    dict(repetition_penalty=1e-39, temperature=1.0),
    dict(repetition_penalty=1e-39, temperature=1.0, top_k=5),
    dict(repetition_penalty=1e-39, temperature=0.05, top_p=0.5),
    dict(repetition_penalty=1e30, temperature=1.5, min_p=0.1),
    dict(repetition_penalty=1e-30, temperature=1.0, presence_penalty=2.0, frequency_penalty=-2.0),
    dict(temperature=1e4, top_k=VOCAB),
    dict(temperature=1e-5 * 1.0001, top_p=1e-9),
    dict(temperature=0.7, top_k=1, min_p=1.0, n=3, logprobs=20),
    dict(repetition_penalty=0.5, temperature=0.0, presence_penalty=-2.0, frequency_penalty=2.0),
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=[str(h) for h in HOSTILE])
def test_a_hostile_neighbour_never_changes_a_greedy_request(model, hostile):
    prompt, other = (p[:8] for p in _prompts(2, seed=7))  # 8 + 8 tokens: prefilled in one step
    kw = dict(max_new_tokens=10, temperature=0, stop_token_ids=[], logprobs=3)
    alone = _engine(model, "portable").generate([prompt], **kw)[0]
    engine = _engine(model, "portable")
    victim = engine.add(prompt, **kw)
    bad = engine.add(other, max_new_tokens=10, stop_token_ids=[], seed=1, **hostile)
    engine.step()  # both admitted in the same step, so every decode step batches them together
    assert len(victim.outputs[0].tokens) == 1 and all(len(c.tokens) == 1 for c in bad.outputs)
    while engine.has_work:
        engine.step()
    out = victim.outputs[0]
    assert (out.tokens, out.logprobs, out.top_logprobs) == (alone.tokens, alone.logprobs, alone.top_logprobs)
    for c in bad.outputs:
        assert c.finish_reason == "length" and len(c.tokens) == 10 and all(0 <= t < VOCAB for t in c.tokens)
