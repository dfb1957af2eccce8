"""Bad requests get a 4xx with the OpenAI error body; the server keeps serving.

The corpus follows the shapes vLLM and llama.cpp test (reliability.md §1.1): bodies that are
not JSON objects, wrong types, out-of-range values, unknown roles and tools, token ids
outside the vocabulary, options that cannot combine, prompts beyond the context. Each
dict body is sent with stream false and true. Then: context-length codes at the exact
boundary, 404/405/413/429/503, and an engine failure mid-stream (an error event, then
[DONE]) with the slot freed afterwards.
"""

import json
import time

import httpx
import openai
import pytest

from serve_support import Server, random_checkpoint, sse_events

M = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

CHAT_RAW = [b"not json", b"", b'"a string"', b"[1, 2]", b"42", b"null",
            b'{"messages": [{"role": "user", "content": "hi"}]', b"messages=hi&model=tiny",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            b'{"messages": [{"role": "user", "content": "\xff"}]}',
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}']
CHAT = [
    {"messages": None}, {"messages": "hello"}, {"messages": []}, {"messages": [123]}, {"messages": [{}]},
    {"messages": [{"role": 123, "content": "x"}]}, {"messages": [{"role": "user", "content": 123}]},
    {"messages": [{"role": "user", "content": "hi"}, {}]}, {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "function", "content": "hi"}]}, {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": [{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 5}}]}]},
    {"messages": M, "temperature": -1}, {"messages": M, "temperature": 3}, {"messages": M, "temperature": "hot"},
    {"messages": M, "top_p": 0}, {"messages": M, "top_p": 1.5}, {"messages": M, "top_k": -2},
    {"messages": M, "n": 0}, {"messages": M, "n": 1000}, {"messages": M, "n": 5.5}, {"messages": M, "n": True},
    {"messages": M, "n": 9},  # more samples than batch slots
    {"messages": M, "max_tokens": 0}, {"messages": M, "max_tokens": -5}, {"messages": M, "max_tokens": 10**9},
    {"messages": M, "max_completion_tokens": "ten"}, {"messages": M, "presence_penalty": 3},
    {"messages": M, "frequency_penalty": -2.5}, {"messages": M, "repetition_penalty": 0},
    {"messages": M, "stop": 5}, {"messages": M, "stop": ["a"] * 17}, {"messages": M, "stop": [""]},
    {"messages": M, "logprobs": True, "top_logprobs": 21}, {"messages": M, "top_logprobs": 3},
    {"messages": M, "logprobs": "yes"}, {"messages": M, "tools": "not a list"},
    {"messages": M, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
    {"messages": M, "tools": [{"type": "retrieval"}]},
    {"messages": M, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "unknown"}}},
    {"messages": M, "tool_choice": "sometimes"}, {"messages": M, "tool_choice": "required"},
    {"messages": M, "seed": "abc"}, {"messages": M, "seed": 1.5}, {"messages": M, "logit_bias": {"100": 5}},
    {"messages": M, "response_format": {"type": "json_schema"}}, {"messages": M, "model": 123},
    {"messages": [{"role": "user", "content": "word " * 400}]},  # longer than the context
    {"messages": M, "stream_options": {"include_usage": "yes"}},
    # issue 21: deep tool-call arguments and schemas, bad sampling values
    {"messages": [M[0], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]}]},
    {"messages": [M[0], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"a":' * 500 + "1" + "}" * 500}}]}]},
    {"messages": M, "tools": [{"type": "function", "function": {"name": "f", "parameters": json.loads(
        '{"a":' * 100 + "1" + "}" * 100)}}]},
    {"messages": M, "repetition_penalty": -1}, {"messages": M, "repetition_penalty": "x"},
    {"messages": M, "min_p": 2}, {"messages": M, "top_k": 1.5},
]
COMPLETIONS_RAW = [b"{bad json", b"[]", b'{"prompt": "x", "max_tokens": 1e999}']
COMPLETIONS = [
    {}, {"prompt": None}, {"prompt": ""}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [-1]}, {"prompt": [[1, -5]]},
    {"prompt": [999999]}, {"prompt": [151700]}, {"prompt": [1.5, 2]}, {"prompt": [True, 1]},
    {"prompt": [[1, 2], "text"]}, {"prompt": {"text": "x"}}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "logprobs": 21}, {"prompt": "x", "logprobs": -1}, {"prompt": "x", "echo": "yes"},
    {"prompt": "x", "suffix": "abc"}, {"prompt": "x", "best_of": 3}, {"prompt": "x", "n": 0},
    {"prompt": "x", "temperature": -0.5}, {"prompt": "x", "max_tokens": 10**6}, {"prompt": [1] * 300},
    {"prompt": "x", "stop": {"a": 1}}, {"prompt": "x", "top_p": -1}, {"prompt": "x", "seed": "s"},
    {"prompt": "x", "max_tokens": "16"}, {"prompt": "x", "presence_penalty": "high"},
    {"prompt": "x", "stream_options": {"include_usage": 1}},
    # issue 21: more prompts than the queue can ever hold (a 400 naming the limit, not a 429)
    {"prompt": [[1, 2]] * 257, "max_tokens": 1}, {"prompt": ["a"] * 300, "max_tokens": 1},
    {"prompt": "x", "repetition_penalty": 0}, {"prompt": "x", "top_p": 2},
]
NOT_FOUND = [("/v1/chat/completions", {"messages": M, "model": "gpt-4"}),
             ("/v1/completions", {"prompt": "x", "model": "davinci-002"})]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("serve_errors"))


@pytest.fixture(scope="module")
def server(ckpt):
    with Server(ckpt, max_batch_size=8, max_seq_len=256) as s:
        yield s


def assert_error(r: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return err


def cases():
    for route, raws, dicts in (("/v1/chat/completions", CHAT_RAW, CHAT), ("/v1/completions", COMPLETIONS_RAW,
                                                                           COMPLETIONS)):
        for raw in raws:
            yield route, raw
        for body in dicts:
            yield route, body
            if "stream_options" not in body:  # stream_options with stream true is valid on its own
                yield route, {**body, "stream": True}


def test_malformed_requests_are_4xx_with_the_error_body(server):
    sent = 0
    for route, body in cases():
        assert_error(server.post(route, body, headers={"Content-Type": "application/json"}))
        sent += 1
    assert sent >= 150  # at least 50 shapes per endpoint x stream on/off, plus raw bodies
    for route, body in NOT_FOUND:
        for stream in (False, True):
            err = assert_error(server.post(route, {**body, "stream": stream}), 404)
            assert err["code"] == "model_not_found" and err["param"] == "model"
    # the server is fine afterwards
    r = server.client().chat.completions.create(model="tiny", messages=M, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert server.metric("qwen25_num_requests_running") == 0 and server.metric("qwen25_num_requests_waiting") == 0


def test_errors_name_the_parameter(server):
    err = assert_error(server.post("/v1/chat/completions", {"messages": M, "temperature": 5}))
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    err = assert_error(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": 1}]}))
    assert err["param"] == "messages[0].content"
    err = assert_error(server.post("/v1/completions", {"prompt": [5, 999999]}))
    assert err["param"] == "prompt" and "vocabulary" in err["message"]
    err = assert_error(server.post("/v1/chat/completions", {"messages": M, "top_logprobs": 3}))
    assert err["param"] == "top_logprobs"
    err = assert_error(server.post("/v1/chat/completions", {"messages": [{"role": "user"}]}))
    assert err["param"] == "messages[0].content"
    with pytest.raises(openai.BadRequestError):  # the official client maps it too
        server.client().chat.completions.create(model="tiny", messages=M, logprobs=True, top_logprobs=30)


def test_context_length_is_enforced_at_the_exact_boundary(server):
    limit = 256
    ok = server.post("/v1/completions", {"prompt": [7] * (limit - 1), "max_tokens": 1})
    assert ok.status_code == 200
    err = assert_error(server.post("/v1/completions", {"prompt": [7] * limit, "max_tokens": 1}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = assert_error(server.post("/v1/completions", {"prompt": [7] * 200, "max_tokens": limit - 199}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    err = assert_error(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "go " * 300}]}))
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    err = assert_error(server.post("/v1/chat/completions", {"messages": M, "max_completion_tokens": 500}))
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_completion_tokens"
    # max_tokens left out: the reply may fill the context, and ends with "length"
    r = server.client().chat.completions.create(model="tiny", messages=M, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == limit


def test_routes_methods_and_sizes(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/models/gpt-4"), 404)
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    big = b'{"prompt": "' + b"a" * (2**20 + 10) + b'"}'
    assert_error(server.post("/v1/completions", big), 413)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4", messages=M)


def test_a_full_queue_answers_429(ckpt):
    with Server(ckpt, max_batch_size=1, max_queue=2, max_seq_len=512) as server:
        client = server.client()
        stream = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # running: it holds the only slot
        waiting = [client.completions.create(model="tiny", prompt=[4, 5], max_tokens=400, stream=True,
                                             extra_body={"ignore_eos": True}) for _ in range(2)]
        deadline = time.monotonic() + 10
        while server.metric("qwen25_num_requests_waiting") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metric("qwen25_num_requests_waiting") == 2
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="tiny", messages=M, max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
        for s in [stream, *waiting]:
            s.close()
        deadline = time.monotonic() + 5
        while (server.metric("qwen25_num_requests_running") or server.metric("qwen25_num_requests_waiting")) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        r = client.chat.completions.create(model="tiny", messages=M, max_tokens=2)  # room again
        assert r.usage.completion_tokens >= 1


class _FailOnce:
    """A forward hook on the embedding that raises on its `at`-th call: an engine failure
    in the middle of a generation (the prompt's prefill is call 1)."""

    def __init__(self, module, at: int):
        self.calls, self.at = 0, at
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("injected engine failure")


def test_an_engine_failure_mid_stream_is_an_error_event_then_done(server):
    embed = server.model.model.embed_tokens
    hook = _FailOnce(embed, at=4)
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": M, "max_tokens": 20, "stream": True, "temperature": 0}) as r:
            assert r.status_code == 200
            events = sse_events(r)
    finally:
        hook.handle.remove()
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and events[-2]["error"]["type"] == "server_error"
    assert any(e != "[DONE]" and e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-2])
    # the official client raises on the error event
    hook = _FailOnce(embed, at=3)
    try:
        with pytest.raises(openai.APIError):
            for _ in server.client().chat.completions.create(model="tiny", messages=M, max_tokens=20, stream=True):
                pass
        hook.calls, hook.at = 0, 2
        with pytest.raises(openai.InternalServerError):  # the one 5xx: our failure, not the client's
            server.client().chat.completions.create(model="tiny", messages=M, max_tokens=20)
    finally:
        hook.handle.remove()
    assert server.metric("qwen25_num_requests_running") == 0
    r = server.client().chat.completions.create(model="tiny", messages=M, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_draining_refuses_new_work_with_503(server):
    server.state.draining = True
    try:
        r = server.post("/v1/chat/completions", {"messages": M})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.state.draining = False
    assert httpx.get(server.url + "/health").status_code == 200

