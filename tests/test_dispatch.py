"""The one log-prob function and the one dispatcher.

References: torch's own `log_softmax` (float64) for the log-prob function, including a
vocabulary split into chunks, a temperature, bf16 logits and its gradient; a naive greedy
loop over full forwards of the model for the dispatcher (tokens, log-probabilities, where a
stop token ends a sample, and the text, which the stop token must not reach).
"""

from __future__ import annotations

import pytest
import torch

from qwen25 import Engine, ModelConfig, build_model, load_tokenizer
from qwen25.engine.dispatch import Dispatcher
from qwen25.engine.sampling import SamplingParams
from qwen25.model.logprobs import IGNORE_INDEX, head_logprobs, token_logprobs, top_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature, vocab_chunk", [(1.0, None), (0.7, 128), (1.3, 1000)])
def test_token_logprobs_equal_log_softmax_and_their_gradient(dtype, temperature, vocab_chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 1000, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (3, 5), generator=g)
    targets[1, 2] = targets[2, 0] = IGNORE_INDEX
    got = token_logprobs(logits, targets, temperature, vocab_chunk=vocab_chunk)
    ref_logits = logits.detach().double().requires_grad_()
    ref = torch.log_softmax(ref_logits / temperature, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref = ref * (targets != IGNORE_INDEX)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert got[1, 2] == 0 and got[2, 0] == 0
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad.to(logits.dtype).double(), atol=2e-3, rtol=1e-2)


def test_top_logprobs_and_head_logprobs_equal_log_softmax():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(7, 16, generator=g)
    targets = torch.randint(0, 300, (7,), generator=g)
    ref = torch.log_softmax(head(hidden).double() / 0.9, -1)
    lps, greedy, (values, ids) = head_logprobs(hidden, head, targets, 0.9, top=4, chunk=3)
    torch.testing.assert_close(lps.double(), ref[torch.arange(7), targets], atol=1e-5, rtol=1e-5)
    assert greedy.tolist() == (ref.argmax(-1) == targets).tolist()
    torch.testing.assert_close(values.double(), ref.topk(4, -1).values, atol=1e-5, rtol=1e-5)
    assert ids.tolist() == ref.topk(4, -1).indices.tolist()
    v, i = top_logprobs(head(hidden).detach(), 4, 0.9)
    assert i.tolist() == ids.tolist()


@pytest.fixture(scope="module")
def setup():
    model = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    with torch.no_grad():  # a spread-out next-token distribution: greedy tokens vary
        for p in model.parameters():
            p.mul_(8.0) if p.dim() == 2 else None
    return model, load_tokenizer("qwen2.5")


def naive(model, prompt, steps):
    """Greedy tokens and their log p (float64 log_softmax of full forwards)."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp[ids[-1]]))
    return ids[len(prompt):], lps


def test_dispatcher_generate_equals_a_naive_loop_and_a_stop_token_has_a_logprob_but_no_text(setup):
    model, tok = setup
    prompts = [tok.encode("Once upon a time"), tok.encode("The capital of")]
    refs = [naive(model, p, 8) for p in prompts]
    stop = refs[1][0][3]  # prompt 1 stops at its 4th greedy token
    assert stop not in refs[1][0][:3]
    engine = Engine(model, max_batch_size=4, max_seq_len=64)
    d = Dispatcher(engine, tok)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,), n=2)
    subs = d.generate(prompts, params, skip_special_tokens=False)
    assert d.active == 0 and not engine.has_work
    for sub, (tokens, lps) in zip(subs, refs):
        cut = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        for i in range(2):
            assert sub.tokens(i) == tokens[:cut]
            assert sub.finish_reason(i) == ("stop" if stop in tokens else "length")
            assert sub.logprobs(i) == pytest.approx(lps[:cut], abs=1e-4)
            body = tokens[:cut - 1] if stop in tokens else tokens
            assert sub.text(i) == tok.decode(body)  # the stop token adds no text
    # Engine.generate runs on the same dispatcher and returns the engine's Completions
    outs = engine.generate(prompts, max_new_tokens=8, temperature=0, stop_token_ids=[stop])
    assert [o.tokens for o in outs] == [subs[0].tokens(0), subs[1].tokens(0)]


def test_dispatcher_events_and_cancel(setup):
    model, tok = setup
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    d = Dispatcher(engine, tok)
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=())
    a = d.submit(tok.encode("alpha"), params, tag="a")
    b = d.submit(tok.encode("beta"), params, tag="b")
    seen = {"a": [], "b": []}
    for _ in range(4):
        for ev in d.step():
            seen[ev.submission.tag].append(ev.token)
    d.cancel(b)
    events = []
    while d.active:
        events += d.step()
    assert b.finish_reason(0) == "cancelled" and a.finish_reason(0) == "length"
    assert [e.finish_reason for e in events if e.submission is b] == ["cancelled"]
    assert seen["a"] + [e.token for e in events if e.submission is a] == a.tokens(0)
    assert a.tokens(0) == naive(model, tok.encode("alpha"), 30)[0]
    assert not engine.has_work
