"""Prompt scoring (`prompt_logprobs`) runs in prefill chunks, between decode steps (issue 21 item 2).

/v1/completions with echo and logprobs scores the prompt. Done as one forward, a 30K-token
prompt froze every running stream for a minute and could not be cancelled. The engine now
scores a prompt with the chunks that prefill it, so:

- the scores equal one full forward's log-softmax (reference: the model called on the whole
  prompt, `torch.log_softmax` in float32; tolerance 1e-5, fp32 weights), top alternatives and
  greediness included, for a prompt of many chunks;
- a running sequence gets a token at every step the scoring request is prefilled in (counted
  in engine steps, not seconds);
- cancelling it stops the chunks at once and frees its slot for the next request.
"""

import pytest
import torch

from qwen25 import Engine, ModelConfig, build_model

VOCAB = 512
CHUNK = 16


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny").replace(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    return build_model(cfg, seed=5)


def _engine(model, **kw) -> Engine:
    kw = {"max_batch_size": 4, "max_seq_len": 256, "prefill_chunk": CHUNK, "decode": "torch", "hugepages": False, **kw}
    return Engine(model, **kw)


def _prompt(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (length,), generator=g).tolist()


def _full_forward_logprobs(model, prompt):
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]  # row t predicts prompt[t + 1]


def _run(engine, request) -> int:
    steps = 0
    while not request.finished:
        engine.step()
        steps += 1
    return steps


def test_chunked_prompt_scores_equal_one_full_forward(model):
    prompt = _prompt(7 * CHUNK + 5)  # 8 chunks, the last one partial
    engine = _engine(model)
    request = engine.add(prompt, max_new_tokens=0, prompt_logprobs=5)
    assert _run(engine, request) == 8  # one chunk per step
    ref = _full_forward_logprobs(model, prompt)
    score = request.prompt_score
    targets = torch.tensor(prompt[1:])
    want = ref.gather(-1, targets[:, None])[:, 0]
    assert len(score.logprobs) == len(prompt) - 1
    assert torch.allclose(torch.tensor(score.logprobs), want, atol=1e-5, rtol=0)
    assert score.greedy == (ref.argmax(-1) == targets).tolist()
    top_values, top_ids = ref.topk(5, dim=-1)
    assert [[i for i, _ in row] for row in score.top_logprobs] == top_ids.tolist()
    got_values = torch.tensor([[v for _, v in row] for row in score.top_logprobs])
    assert torch.allclose(got_values, top_values, atol=1e-5, rtol=0)
    # scored only: no token, finished by length, its slot free again
    assert [(c.tokens, c.finish_reason) for c in request.outputs] == [([], "length")]
    assert sorted(engine.scheduler._free) == list(range(4))
    assert not engine.has_work


def test_scoring_does_not_change_what_is_generated(model):
    prompt = _prompt(3 * CHUNK + 2, seed=1)
    kw = dict(max_new_tokens=6, temperature=0, stop_token_ids=[], logprobs=2)
    plain = _engine(model).generate([prompt], n=2, **kw)[0]  # n=2 too: the same decode batch size
    engine = _engine(model)
    scored = engine.add(prompt, prompt_logprobs=0, n=2, **kw)
    only = engine.add(prompt, prompt_logprobs=0, max_new_tokens=0)
    while engine.has_work:
        engine.step()
    for out in scored.outputs:
        assert (out.tokens, out.logprobs, out.top_logprobs) == (plain.tokens, plain.logprobs, plain.top_logprobs)
    assert scored.prompt_score.logprobs == only.prompt_score.logprobs  # the same chunks, the same numbers
    assert scored.prompt_score.top_logprobs is None


def test_a_one_token_prompt_has_nothing_to_score(model):
    engine = _engine(model)
    request = engine.add([7], max_new_tokens=0, prompt_logprobs=3)
    _run(engine, request)
    assert request.prompt_score.logprobs == [] and request.outputs[0].finish_reason == "length"


def test_a_running_stream_gets_a_token_at_every_scoring_step(model):
    engine = _engine(model, max_seq_len=1024)
    stream = engine.add(_prompt(5, seed=2), max_new_tokens=500, temperature=0, stop_token_ids=[])
    engine.step()
    assert len(stream.outputs[0].tokens) == 1  # decoding
    prompt = _prompt(40 * CHUNK, seed=3)
    scoring = engine.add(prompt, max_new_tokens=0, prompt_logprobs=1)
    progress, stream_tokens = [], []
    while not scoring.finished:
        engine.step()
        progress.append(scoring._progress)
        stream_tokens.append(len(stream.outputs[0].tokens))
    # each step prefills one chunk of the scored prompt and decodes the stream once
    assert progress == [CHUNK * (i + 1) for i in range(40)]
    assert stream_tokens == [2 + i for i in range(40)]
    assert stream.outputs[0].finish_reason is None


def test_cancelling_a_scoring_request_stops_its_chunks_and_frees_its_slot(model):
    engine = _engine(model, max_batch_size=1, max_seq_len=1024)
    prompt = _prompt(50 * CHUNK, seed=4)
    scoring = engine.add(prompt, max_new_tokens=0, prompt_logprobs=0)
    for _ in range(3):
        engine.step()
    assert scoring._progress == 3 * CHUNK
    engine.cancel(scoring)
    assert scoring.outputs[0].finish_reason == "cancelled" and scoring.prompt_score is None
    assert scoring not in engine.scheduler._waiting and engine.scheduler._free == [0]
    # the only slot serves the next request at once; the cancelled prompt is not prefilled further
    nxt = engine.add(_prompt(4, seed=5), max_new_tokens=2, temperature=0, stop_token_ids=[])
    steps = _run(engine, nxt)
    assert steps == 2 and scoring._progress == 3 * CHUNK


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "3", True])
def test_bad_prompt_logprobs_are_user_errors(model, bad):
    from qwen25.errors import UserError

    with pytest.raises(UserError, match="prompt_logprobs"):
        _engine(model).add([3, 4], max_new_tokens=0, prompt_logprobs=bad)


def test_max_new_tokens_zero_needs_prompt_logprobs(model):
    from qwen25.errors import UserError

    with pytest.raises(UserError, match="max_new_tokens"):
        _engine(model).add([3, 4], max_new_tokens=0)
