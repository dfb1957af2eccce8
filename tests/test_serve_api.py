"""The OpenAI API through the official client against a live server, checked against references.

References: the engine run in-process on its own copy of the checkpoint (tokens, usage),
`transformers`' Qwen2ForCausalLM loaded from the same folder (log-probabilities, abs 1e-4),
the HF tokenizer's chat template (prompt tokens), and the wire-format rules of
reliability.md §1.3 (streaming invariants) checked on the raw SSE bytes.
"""

import httpx
import pytest
import torch

from qwen25 import Engine, load_model, load_tokenizer
from serve_support import Server, random_checkpoint, sse_events

MESSAGES = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Write a haiku about CPUs."}, {"role": "assistant", "content": "Silicon hums."},
     {"role": "user", "content": "Another one, longer please"}],
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def server(ckpt):
    with Server(ckpt, max_batch_size=8, max_seq_len=256) as s:
        yield s


@pytest.fixture(scope="module")
def reference(ckpt):
    """An independent engine on its own copy of the weights, and the tokenizer."""
    model = load_model(ckpt)
    return Engine(model, max_batch_size=4, max_seq_len=256, hugepages=False), load_tokenizer(ckpt)


def reference_chat(reference, messages, **kw):
    engine, tok = reference
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = engine.generate([prompt], stop_token_ids=list(tok.stop_token_ids), **kw)[0]
    body = out.tokens[:-1] if out.finish_reason == "stop" else out.tokens
    return prompt, out, tok.decode(body, skip_special_tokens=True)


def test_chat_equals_the_engine_with_exact_usage(server, reference):
    client = server.client()
    for messages in MESSAGES:
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        prompt, out, text = reference_chat(reference, messages, max_new_tokens=12, temperature=0)
        assert r.object == "chat.completion" and r.model == "tiny" and r.system_fingerprint
        choice = r.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == text
        assert choice.finish_reason == out.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(out.tokens))
        assert r.usage.total_tokens == len(prompt) + len(out.tokens)


def test_streaming_invariants_and_equality_with_non_streaming(server):
    client = server.client()
    for messages in MESSAGES:
        body = {"model": "tiny", "messages": messages, "max_tokens": 14, "temperature": 0}
        full = client.chat.completions.create(**body)
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = sse_events(resp)
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        chunks = events[:-1]
        assert len({c["id"] for c in chunks}) == 1
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert not any("role" in ch["delta"] for c in chunks[1:] for ch in c["choices"])
        reasons = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
        assert reasons == [full.choices[0].finish_reason]
        text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
        assert text == full.choices[0].message.content
        *rest, last = chunks
        assert last["choices"] == [] and last["usage"] == full.usage.model_dump(exclude_none=True)
        assert all(c["usage"] is None for c in rest)
        # and the official client parses the same stream
        streamed = client.chat.completions.create(**body, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_n_samples_are_seeded_streamed_and_counted(server):
    client = server.client()
    body = dict(model="tiny", messages=MESSAGES[0], max_tokens=10, temperature=1.0, seed=5, n=3)
    a = client.chat.completions.create(**body)
    b = client.chat.completions.create(**body)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # three different samples
    # sample j of a seeded request is the request with seed + j (as the engine promises)
    single = client.chat.completions.create(**{**body, "n": 1, "seed": 6})
    assert single.choices[0].message.content == a.choices[1].message.content
    # usage: the prompt once, the completions summed
    assert a.usage.prompt_tokens == single.usage.prompt_tokens
    assert a.usage.completion_tokens == 30  # 3 x 10, the random model rarely stops itself
    stream = client.chat.completions.create(**body, stream=True)
    texts, reasons = ["", "", ""], [[], [], []]
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                reasons[ch.index].append(ch.finish_reason)
    assert texts == [c.message.content for c in a.choices]
    assert all(len(r) == 1 for r in reasons)


def test_chat_logprobs(server, ckpt, reference):
    client = server.client()
    messages = MESSAGES[1]
    none = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert none.choices[0].logprobs is None
    zero = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=0)
    assert all(t.top_logprobs == [] for t in zero.choices[0].logprobs.content)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens  # no eos among them: finish_reason is "length"
    assert r.choices[0].finish_reason == "length"
    assert all(len(t.top_logprobs) == 5 and t.logprob <= 0 for t in content)
    text = b"".join(bytes(t.bytes) for t in content).decode("utf-8", errors="replace")
    assert text == r.choices[0].message.content
    # the tokens are the greedy ones; the values those of a full forward of the model (abs 1e-4)
    prompt, out, _ = reference_chat(reference, messages, max_new_tokens=6, temperature=0)
    tok = reference[1]
    assert [bytes(t.bytes) for t in content] == [tok.id_to_bytes(i) for i in out.tokens]
    ids = prompt + out.tokens
    with torch.no_grad():
        logp = torch.log_softmax(load_model(ckpt)(torch.tensor([ids]))[0].float(), -1)
    for i, t in enumerate(content):
        row = logp[len(prompt) - 1 + i]
        assert abs(t.logprob - row[ids[len(prompt) + i]].item()) < 1e-4
        assert abs(t.top_logprobs[0].logprob - row.max().item()) < 1e-4
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)  # greedy took the best


def test_completions_echo_logprobs_as_lm_eval_uses_them(server, ckpt):
    """lm-eval `local-completions`: prompt = token ids (batched), echo, logprobs=1, max_tokens=1;
    loglikelihood = sum(token_logprobs[ctxlen:-1]); greedy iff each equals max(top.values())."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(ckpt)
    contexts = ["The capital of France is", "Two plus two equals"]
    conts = [" Paris", " four"]
    prompts = [tok.encode(c + x) for c, x in zip(contexts, conts)]
    ctxlens = [len(tok.encode(c)) for c in contexts]
    r = server.client().completions.create(model="tiny", prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                           temperature=0, seed=1234)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert sorted(c.index for c in r.choices) == [0, 1]
    for choice, ids, ctxlen in zip(sorted(r.choices, key=lambda c: c.index), prompts, ctxlens):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens[:len(ids)] == [tok.decode([i]) for i in ids]
        assert choice.text.startswith(tok.decode(ids))
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        want = [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:len(ids)], want)) < 1e-4
        loglik = sum(lp.token_logprobs[ctxlen:-1])
        assert abs(loglik - sum(want[ctxlen - 1:])) < 1e-4
        greedy = all(v == max(top.values()) for v, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
        assert greedy == all(logp[t - 1].argmax().item() == ids[t] for t in range(ctxlen, len(ids)))
        # the generated token: the greedy continuation of the prompt
        assert lp.token_logprobs[-1] == pytest.approx(logp[-1].max().item(), abs=1e-4)
        # text offsets point at each token's text
        assert [choice.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)][:len(ids)] == lp.tokens[:len(ids)]
    # max_tokens=0 with echo scores the prompt and generates nothing
    scored = server.client().completions.create(model="tiny", prompt=prompts[0], echo=True, logprobs=0, max_tokens=0)
    assert scored.usage.completion_tokens == 0 and len(scored.choices[0].logprobs.token_logprobs) == len(prompts[0])
    first = min(r.choices, key=lambda c: c.index)
    assert scored.choices[0].logprobs.token_logprobs[1:] == first.logprobs.token_logprobs[1:len(prompts[0])]


def test_completions_text_prompts_stream_like_non_stream(server, reference):
    engine, tok = reference
    client = server.client()
    prompts = ["Once upon a time", "def main():\n   "]
    body = dict(model="tiny", prompt=prompts, max_tokens=9, temperature=0, n=2)
    full = client.completions.create(**body)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        out = engine.generate([tok.encode(prompt)], max_new_tokens=9, temperature=0,
                              stop_token_ids=list(tok.stop_token_ids))[0]
        body_ids = out.tokens[:-1] if out.finish_reason == "stop" else out.tokens
        assert full.choices[2 * p].text == full.choices[2 * p + 1].text == tok.decode(body_ids, skip_special_tokens=True)
    texts = {}
    reasons = {}
    for chunk in client.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                reasons.setdefault(ch.index, []).append(ch.finish_reason)
        if not chunk.choices:
            assert chunk.usage.total_tokens == full.usage.total_tokens
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert all(len(reasons[i]) == 1 for i in range(4))
    short = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4, temperature=0)
    echo = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text == prompts[0] + short.choices[0].text


def test_stop_strings_never_leak_into_the_stream(server, reference):
    """Stop strings cut from the greedy text across 1-4 tokens, at several split points."""
    engine, tok = reference
    client = server.client()
    messages = MESSAGES[2]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = engine.generate([prompt], max_new_tokens=24, temperature=0, stop_token_ids=[])[0]
    pieces = [tok.decode([t]) for t in out.tokens]
    assert all("\ufffd" not in p for p in pieces[4:12]), "pick a prompt whose reply is whole characters"
    text = "".join(pieces)
    cases = []
    for start, span in [(4, 1), (5, 2), (6, 3), (7, 4)]:
        head = pieces[start][len(pieces[start]) // 2:]  # split inside the first token
        stop = head + "".join(pieces[start + 1:start + span])
        if stop:
            cases.append(stop)
    for stop in cases:
        cut = text.find(stop)
        expected_tokens = next(m for m in range(1, len(pieces) + 1) if stop in "".join(pieces[:m]))
        body = dict(model="tiny", messages=messages, max_tokens=24, temperature=0, stop=[stop, "never-there"],
                    extra_body={"ignore_eos": True})
        full = client.chat.completions.create(**body)
        assert full.choices[0].message.content == text[:cut]
        assert full.choices[0].finish_reason == "stop"
        assert full.usage.completion_tokens == expected_tokens
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                           if c.choices)
        assert streamed == text[:cut]


def test_generation_config_supplies_the_defaults(tmp_path):
    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
           "eos_token_id": [151645, 151643]}
    ckpt = random_checkpoint(tmp_path / "gc", seed=1, generation_config=gen)
    model = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    engine = Engine(model, max_batch_size=2, max_seq_len=256, hugepages=False)
    prompt = tok.apply_chat_template(MESSAGES[0], add_generation_prompt=True)

    def ref(**kw):
        out = engine.generate([prompt], max_new_tokens=16, seed=7, stop_token_ids=[151643, 151645], **kw)[0]
        return tok.decode(out.tokens[:-1] if out.finish_reason == "stop" else out.tokens, skip_special_tokens=True)

    with Server(ckpt) as server:
        r = server.client().chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=16, seed=7)
    assert r.choices[0].message.content == ref(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert r.choices[0].message.content != ref(temperature=1.0)


def test_models_health_version_tokenize(server, ckpt):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].model_extra["max_model_len"] == 256
    assert client.models.retrieve("tiny").id == "tiny"
    assert server.post("/health", {}).status_code == 405  # GET only
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(server.url + "/version").json()
    tok = load_tokenizer(ckpt)
    r = server.post("/tokenize", {"prompt": "Hello <|im_end|> world"}).json()
    assert r["tokens"] == tok.encode("Hello <|im_end|> world", allow_special=True) and r["count"] == len(r["tokens"])
    r = server.post("/tokenize", {"messages": MESSAGES[1]}).json()
    assert r["tokens"] == tok.apply_chat_template(MESSAGES[1], add_generation_prompt=True)
    assert server.post("/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == tok.decode(r["tokens"])
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"]


def test_metrics_count_exactly(server):
    client = server.client()
    before = {k: server.metric(k) for k in ("qwen25_request_success_total", "qwen25_generation_tokens_total",
                                            "qwen25_prompt_tokens_total", "qwen25_time_to_first_token_seconds_count")}
    usage = []
    for _ in range(10):
        r = client.completions.create(model="tiny", prompt=[11, 22, 33, 44, 55], max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
        usage.append(r.usage)
    assert all(u.completion_tokens == 10 and u.prompt_tokens == 5 for u in usage)
    assert server.metric("qwen25_request_success_total") - before["qwen25_request_success_total"] == 10
    assert server.metric("qwen25_generation_tokens_total") - before["qwen25_generation_tokens_total"] == 100
    assert server.metric("qwen25_prompt_tokens_total") - before["qwen25_prompt_tokens_total"] == 50
    assert server.metric("qwen25_time_to_first_token_seconds_count") - \
        before["qwen25_time_to_first_token_seconds_count"] == 10
    assert server.metric("qwen25_num_requests_running") == 0 and server.metric("qwen25_num_requests_waiting") == 0


def test_api_keys_guard_v1_and_leave_health_open(ckpt):
    import openai

    with Server(ckpt, api_keys=("sk-one", "sk-two")) as server:
        for key in ("sk-one", "sk-two"):
            r = server.client(api_key=key).chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=2)
            assert r.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="sk-wrong").chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=2)
        assert e.value.body["type"] == "authentication_error"
        for headers in ({}, {"Authorization": "sk-one"}, {"Authorization": "Basic sk-one"}):
            r = httpx.get(server.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200
