"""Engine against transformers and against the model without a cache.

Every test runs on each decode path this machine has: "torch" (the PyTorch model),
"portable" (the C++ decoder, plain C++) and "auto" (the AVX-512 kernels where the CPU has
them, else the PyTorch model), so no path goes untested and nothing is skipped.

Reference weights: a random `transformers` Qwen2ForCausalLM (fp32; every parameter, biases
and norm scales included, is noise), saved with save_pretrained and read back with
`qwen25.load_model`.
"""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import randomize_
from qwen25 import Engine, load_model
from qwen25.errors import UserError

PATHS = ["torch", "portable", "auto"]
VOCAB, EOS = 512, 511
PROMPTS = [[5, 17, 200, 33, 9], [101, 7, 7, 300, 2, 64, 19, 480, 3, 77, 15], [12] * 3 + list(range(40, 54))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=EOS)
    torch.manual_seed(0)
    hf = randomize_(Qwen2ForCausalLM(cfg), seed=0, std=0.1).eval()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint[1], dtype="float32")


def hf_greedy(hf, prompts, max_new_tokens):
    """transformers' greedy generate on a left-padded batch, cut after the first eos."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=0, eos_token_id=EOS)
    rows = []
    for row in out[:, T:].tolist():
        rows.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.parametrize("path", PATHS)
def test_greedy_equals_transformers_for_a_ragged_batch(checkpoint, model, path):
    hf, _ = checkpoint
    engine = Engine(model, max_batch_size=4, max_seq_len=64, decode=path)
    results = engine.generate(PROMPTS, max_new_tokens=20, temperature=0)
    assert [r.tokens for r in results] == hf_greedy(hf, PROMPTS, 20)
    for r in results:
        assert r.finish_reason == ("stop" if r.tokens[-1] == EOS else "length")
    assert len(set(results[1].tokens)) > 3  # a continuation that is not a repeated token


@pytest.mark.parametrize("path", PATHS)
def test_logprobs_are_those_of_transformers(checkpoint, model, path):
    hf, _ = checkpoint
    prompt = PROMPTS[1]
    engine = Engine(model, max_batch_size=2, max_seq_len=64, decode=path)
    result = engine.generate([prompt], max_new_tokens=6, temperature=0, logprobs=3, stop_token_ids=[])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + result.tokens])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    expected = ref.gather(-1, torch.tensor(result.tokens)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=1e-4)
    for step, alts in enumerate(result.top_logprobs):
        assert [i for i, _ in alts] == ref[step].topk(3).indices.tolist()


@pytest.mark.parametrize("path", PATHS)
def test_cached_decode_logits_equal_a_full_forward(model, path):
    engine = Engine(model, max_batch_size=3, max_seq_len=64, decode=path)
    runner = engine.runner
    seqs = {0: list(PROMPTS[0]), 2: list(PROMPTS[2])}  # ragged rows in non-adjacent slots
    runner.prefill(0, seqs[0][:3], want_logits=False)  # a prompt prefilled in two chunks
    runner.prefill(0, seqs[0][3:], want_logits=True)
    runner.prefill(2, seqs[2], want_logits=True)
    for step in range(5):
        new = [(7 * step + 3) % VOCAB, (11 * step + 5) % VOCAB]
        logits = runner.decode([0, 2], new)
        for row, (slot, tok) in enumerate(zip((0, 2), new)):
            seqs[slot].append(tok)
            with torch.no_grad():
                full = model(torch.tensor([seqs[slot]]))[0, -1]
            torch.testing.assert_close(logits[row], full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["portable", "auto"])
def test_bf16_decode_matches_the_bf16_model(checkpoint, path):
    """bf16: the C++ decoder rounds where the model rounds, so logits differ from the
    model's own bf16 forward only by summation order: within 2 bf16 ulps (2^-6 at |x|<2)."""
    bf16 = load_model(checkpoint[1], dtype="bfloat16")
    engine = Engine(bf16, max_batch_size=2, max_seq_len=64, decode=path)
    prompt = PROMPTS[2]
    engine.runner.prefill(1, prompt, want_logits=True)
    ids = list(prompt)
    for tok in (4, 99, 250):
        logits = engine.runner.decode([1], [tok])[0]
        ids.append(tok)
        with torch.no_grad():
            full = bf16(torch.tensor([ids]))[0, -1].float()
        torch.testing.assert_close(logits, full, atol=2 ** -5, rtol=2 ** -7)


@pytest.mark.parametrize("path", PATHS)
def test_stream_yields_exactly_what_generate_returns(model, path):
    engine = Engine(model, max_batch_size=2, max_seq_len=64, decode=path)
    kw = dict(max_new_tokens=15, temperature=0.9, top_p=0.95, top_k=50, seed=11)
    generated = engine.generate([PROMPTS[0]], **kw)[0].tokens
    assert list(engine.stream(PROMPTS[0], **kw)) == generated
    greedy = engine.generate([PROMPTS[2]], max_new_tokens=15, temperature=0)[0].tokens
    assert list(engine.stream(PROMPTS[2], max_new_tokens=15, temperature=0)) == greedy


@pytest.mark.parametrize("path", PATHS)
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model, path):
    engine = Engine(model, max_batch_size=4, max_seq_len=64, decode=path)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=5, repetition_penalty=1.1, presence_penalty=0.3)
    alone = engine.generate([PROMPTS[1]], **kw)[0].tokens
    assert engine.generate([PROMPTS[1]], **kw)[0].tokens == alone
    batched = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], **kw)
    assert batched[1].tokens == alone
    assert engine.generate([PROMPTS[1]], **{**kw, "seed": 6})[0].tokens != alone
    # n samples share one prefill; sample j is the request with seed + j
    shared = engine.generate([PROMPTS[1]], n=3, **kw)
    for j in range(3):
        assert shared[j].tokens == engine.generate([PROMPTS[1]], **{**kw, "seed": 5 + j})[0].tokens


@pytest.mark.parametrize("path", PATHS)
def test_requests_join_a_running_batch(model, path):
    """Continuous batching: a request added mid-decode gets the same greedy tokens."""
    engine = Engine(model, max_batch_size=2, max_seq_len=64, decode=path, prefill_chunk=4)
    alone = [engine.generate([p], max_new_tokens=10, temperature=0, stop_token_ids=[])[0].tokens for p in PROMPTS]
    first = engine.add(PROMPTS[0], max_new_tokens=10, temperature=0, stop_token_ids=[])
    for _ in range(3):
        engine.step()
    late = [engine.add(p, max_new_tokens=10, temperature=0, stop_token_ids=[]) for p in PROMPTS[1:]]
    events = []
    while engine.has_work:
        events += engine.step()
    assert [first.outputs[0].tokens] + [r.outputs[0].tokens for r in late] == alone
    # every token came out as exactly one event, the last one flagged
    for r in late:
        mine = [e for e in events if e.request is r]
        assert [e.token for e in mine] == r.outputs[0].tokens
        assert [e.finished for e in mine] == [False] * 9 + [True]


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    a = engine.add(PROMPTS[0], max_new_tokens=50, temperature=0)
    b = engine.add(PROMPTS[1], max_new_tokens=3, temperature=0, stop_token_ids=[])
    engine.step()
    engine.cancel(a)
    while engine.has_work:
        engine.step()
    assert a.outputs[0].finish_reason == "cancelled" and len(a.outputs[0].tokens) == 1
    assert b.outputs[0].finish_reason == "length" and len(b.outputs[0].tokens) == 3
    it = engine.stream(PROMPTS[2], max_new_tokens=30, temperature=0)
    next(it)
    it.close()  # closing a stream cancels it
    assert engine.generate([PROMPTS[0]], max_new_tokens=2, temperature=0)[0].finish_reason is not None


def test_stop_tokens_and_context_limit(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=24)
    free = engine.generate([PROMPTS[0]], max_new_tokens=8, temperature=0, stop_token_ids=[])[0]
    stop_at = free.tokens[4]
    cut = engine.generate([PROMPTS[0]], max_new_tokens=8, temperature=0, stop_token_ids=[stop_at])[0]
    assert cut.tokens == free.tokens[:free.tokens.index(stop_at) + 1] and cut.finish_reason == "stop"
    assert model.generation_config["eos_token_id"] == EOS  # stop_token_ids=None means these
    long = engine.generate([PROMPTS[2]], max_new_tokens=50, temperature=0, stop_token_ids=[])[0]
    assert len(PROMPTS[2]) + len(long.tokens) == 24 and long.finish_reason == "length"


def test_score_equals_transformers_log_softmax(checkpoint, model):
    hf, _ = checkpoint
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    prompt, cont = PROMPTS[1], [3, 9, 27, 81]
    scored = engine.score(prompt, cont, top_logprobs=2)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    torch.testing.assert_close(torch.tensor(scored.logprobs), ref[range(4), cont], atol=1e-5, rtol=1e-5)
    assert scored.greedy == [ref[i].argmax().item() == c for i, c in enumerate(cont)]
    assert [a for a, _ in scored.top_logprobs[0]] == ref[0].topk(2).indices.tolist()


@pytest.mark.parametrize("call, match", [
    (lambda e: e.generate([list(range(1, 40))], max_new_tokens=1), "longer|context"),
    (lambda e: e.generate([[1, 2]], temperature=-1), "temperature"),
    (lambda e: e.generate([[1, 2]], top_p=0), "top_p"),
    (lambda e: e.generate([[1, 2]], top_p=1.01), "top_p"),
    (lambda e: e.generate([[]]), "empty prompt"),
    (lambda e: e.generate([[1, VOCAB]]), "outside the model's vocabulary"),
    (lambda e: e.generate([[1, -3]]), "outside the model's vocabulary"),
    (lambda e: e.generate([["a", "b"]]), "token ids"),
    (lambda e: e.generate([1, 2, 3]), "list of prompts"),
    (lambda e: e.generate([[1]], n=5), "max_batch_size"),
    (lambda e: e.score([], [1]), "empty prompt"),
    (lambda e: e.score([1], []), "continuation"),
])
def test_bad_input_raises_a_user_error(model, call, match):
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    with pytest.raises(UserError, match=match):
        call(engine)
    assert not engine.has_work  # nothing half-queued


def test_bad_engine_arguments(model):
    with pytest.raises(UserError, match="max_batch_size"):
        Engine(model, max_batch_size=0)
    with pytest.raises(UserError, match="max_seq_len"):
        Engine(model, max_seq_len=1)


@pytest.mark.parametrize("path", PATHS)
def test_decode_over_a_long_context_equals_a_full_forward(model, path):
    """Past 512 cached keys the C++ attention splits the keys into blocks and merges them;
    a short row decodes in the same batch."""
    engine = Engine(model, max_batch_size=2, max_seq_len=1400, decode=path)
    runner = engine.runner
    g = torch.Generator().manual_seed(3)
    long_seq = torch.randint(0, VOCAB, (1300,), generator=g).tolist()
    short_seq = [5, 6, 7]
    runner.prefill(1, long_seq[:1100], want_logits=False)
    runner.prefill(0, short_seq, want_logits=False)
    for n_long in (1101, 1102, 1300):
        gap = long_seq[runner.cache.lengths[1]:n_long - 1]
        if gap:  # skip ahead
            runner.prefill(1, gap, want_logits=False)
        logits = runner.decode([1, 0], [long_seq[n_long - 1], 11])
        short_seq.append(11)
        with torch.no_grad():
            full_long = model(torch.tensor([long_seq[:n_long]]))[0, -1]
            full_short = model(torch.tensor([short_seq]))[0, -1]
        torch.testing.assert_close(logits[0], full_long, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], full_short, atol=5e-5, rtol=1e-5)
