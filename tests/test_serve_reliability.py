"""What an adversarial probe broke in the server (issue 21 items 1-8), and the general
promises behind them: a client's mistake is never a 5xx, one request never changes or fails
another's output, no request (a 4K-token prompt scoring among them) stops running streams for
more than a prefill chunk, every request is cancelled by hanging up, the tokenizer routes
neither block the event loop nor run for anyone without the key, and a shutdown that runs out
of time still answers every client in the OpenAI format.

Time never decides a test: progress is counted in engine steps (decode calls, prefill
chunks), and a "slow" engine is one whose step sleeps, so that a request cannot finish
within a shutdown timeout whatever the machine's speed.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from qwen25.serve.worker import PromptScores
from serve_support import Server, random_checkpoint, sse_events

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
M = [{"role": "user", "content": "hi"}]
EVERY_PRIVATE_USE = "".join(chr(c) for c in range(0xF0000, 0x10FFFE))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("serve_rel"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(ckpt):
    with Server(ckpt, max_batch_size=4, max_seq_len=256, api_keys=[KEY], max_queue=16,
                max_body_bytes=8 * 2**20) as s:
        yield s


def _post(server, route, body, **kw):
    data = json.dumps(body, ensure_ascii=False).encode() if not isinstance(body, bytes) else body
    return httpx.post(server.url + route, content=data, timeout=120,
                      headers={**AUTH, "Content-Type": "application/json"}, **kw)


def _greedy_stream(server, prompt, n_tokens, out, key):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120, headers=AUTH,
                      json={"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as r:
        out[key] = (r.status_code, sse_events(r))


def _text(events):
    return "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e.get("choices"))


# ---- item 1: extreme sampling values are computed safely and fail nobody else -------------------

HOSTILE_SAMPLING = [
    {"repetition_penalty": 1e-39, "temperature": 1},
    {"repetition_penalty": 1e-39, "temperature": 1, "top_k": 5},
    {"repetition_penalty": 1e-39, "temperature": 0.05, "top_p": 0.5},
    {"repetition_penalty": 1e30, "temperature": 1.5, "min_p": 0.1},
    {"repetition_penalty": 1e-30, "temperature": 1, "presence_penalty": 2, "frequency_penalty": -2},
]


def test_extreme_sampling_values_never_fail_this_or_another_request(server):
    prompt = [11, 22, 33, 44]
    alone: dict = {}
    _greedy_stream(server, prompt, 24, alone, "ref")
    reference = _text(alone["ref"][1])
    for params in HOSTILE_SAMPLING:
        got: dict = {}
        neighbour = threading.Thread(target=_greedy_stream, args=(server, prompt, 24, got, "n"))
        neighbour.start()
        time.sleep(0.05)
        r = _post(server, "/v1/chat/completions", {"messages": M, "max_tokens": 8, "seed": 1, **params})
        neighbour.join(120)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (params, r.status_code, r.text[:200])
        status, events = got["n"]
        assert status == 200 and events[-1] == "[DONE]"
        assert not any("error" in e for e in events if e != "[DONE]"), params
        assert _text(events) == reference, params  # the neighbour's greedy output is unchanged


# ---- item 2: scoring a long prompt runs in prefill chunks, between decode steps, cancellable --------

CHUNK = 16


@pytest.fixture(scope="module")
def scoring_server(ckpt):
    with Server(ckpt, max_batch_size=4, max_seq_len=4096, prefill_chunk=CHUNK, api_keys=[KEY]) as s:
        yield s


def _ids(count: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 150000, (count,), generator=g).tolist()


def _score_body(ids: list[int], top: int = 0) -> dict:
    return {"prompt": ids, "echo": True, "logprobs": top, "max_tokens": 0}


def test_scores_of_a_many_chunk_prompt_equal_one_full_forward(scoring_server):
    """Reference: the server's own model (fp32) on the whole prompt at once, log_softmax in
    float32; tolerance 1e-5."""
    ids = _ids(10 * CHUNK + 3, seed=1)
    # scoring only (max_tokens 0 cannot be streamed), and scoring streamed in front of a token
    for stream in (False, True):
        body = {**_score_body(ids, top=3), "stream": stream, "max_tokens": int(stream)}
        if stream:
            with httpx.stream("POST", scoring_server.url + "/v1/completions", json=body, headers=AUTH,
                              timeout=120) as r:
                events = sse_events(r)
            lp = {"token_logprobs": [], "top_logprobs": []}
            for e in events[:-1]:
                for k in lp:
                    lp[k] += e["choices"][0]["logprobs"][k]
        else:
            r = _post(scoring_server, "/v1/completions", body)
            assert r.status_code == 200, r.text[:300]
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
            lp = choice["logprobs"]
        with torch.no_grad():
            ref = torch.log_softmax(scoring_server.model(torch.tensor([ids]))[0].float(), -1)
        want = ref[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + stream
        assert torch.allclose(torch.tensor(lp["token_logprobs"][1:len(ids)]), want, atol=1e-5, rtol=0), stream
        best = torch.tensor([max(top.values()) for top in lp["top_logprobs"][1:len(ids)]])
        assert torch.allclose(best, ref[:-1].max(-1).values, atol=1e-5, rtol=0)


def _spy(monkeypatch, server):
    """Count decode calls, and record the decode count whenever prompt scores are sent, and
    every submitted job."""
    seen = {"decodes": 0, "scores_sent_at": [], "jobs": []}
    runner, worker = server.engine.runner, server.state.worker
    decode, send, submit = runner.decode, worker._send, worker.submit

    def counting_decode(*a, **kw):
        seen["decodes"] += 1
        return decode(*a, **kw)

    def spying_send(job, item):
        if isinstance(item, PromptScores):
            seen["scores_sent_at"].append(seen["decodes"])
        send(job, item)

    def spying_submit(job, loop):
        seen["jobs"].append(job)
        submit(job, loop)

    monkeypatch.setattr(runner, "decode", counting_decode)
    monkeypatch.setattr(worker, "_send", spying_send)
    monkeypatch.setattr(worker, "submit", spying_submit)
    return seen


def test_a_long_scoring_request_lets_running_streams_decode(scoring_server, monkeypatch):
    """While a 64-chunk prompt is scored, a running stream is decoded at (nearly) every
    step: as one forward, the stream got no token until the scores were sent."""
    seen = _spy(monkeypatch, scoring_server)
    chunks = 64
    with httpx.stream("POST", scoring_server.url + "/v1/completions", headers=AUTH, timeout=120,
                      json={"prompt": [5, 6, 7], "max_tokens": 3000, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # decoding
        before = seen["decodes"]
        r = _post(scoring_server, "/v1/completions", _score_body(_ids(chunks * CHUNK, seed=2)))
        assert r.status_code == 200, r.text[:300]
    assert len(seen["scores_sent_at"]) == 1
    assert seen["scores_sent_at"][0] - before >= chunks - 2  # a decode step per scored chunk


def _raw_post(server, body: dict, stream: bool) -> socket.socket:
    """Send a request on a raw socket (closed by the caller: a client hanging up)."""
    data = json.dumps({**body, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\n" +
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _until(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout  # a bound for a broken server, not a speed claim
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_hanging_up_cancels_scoring_and_frees_the_engine(scoring_server, monkeypatch, stream):
    """Scoring only (not streamed), or scoring then one token (streamed, as max_tokens 0 cannot
    be). The engine is slowed (each step sleeps 20 ms) so that the 250-chunk scoring cannot
    end before the hang-up is noticed (a non-streaming request polls every 0.5 s)."""
    seen = _spy(monkeypatch, scoring_server)
    engine = scoring_server.engine
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    ids = _ids(250 * CHUNK - 1, seed=3)
    sock = _raw_post(scoring_server, {**_score_body(ids), "max_tokens": int(stream)}, stream)

    def scoring_request():
        jobs = [j for j in seen["jobs"] if j.prompts[0] == ids]
        return jobs[0].submissions[0].request if jobs and jobs[0].submissions else None

    _until(lambda: seen["scores_sent_at"] or (scoring_request() and scoring_request()._progress >= 3 * CHUNK),
           "the scoring to start")
    assert not seen["scores_sent_at"], "the prompt was scored in one piece, before the client could hang up"
    request = scoring_request()
    sock.close()
    _until(lambda: request.finished, "the hang-up to cancel the scoring")
    assert request.outputs[0].finish_reason == "cancelled"
    progress = request._progress
    assert progress < len(ids) and request not in engine.scheduler._waiting
    # the next request is served at once, and the cancelled prompt is not prefilled further
    r = _post(scoring_server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert request._progress == progress and not seen["scores_sent_at"]
    _until(lambda: scoring_server.metric("qwen25_num_requests_waiting") == 0, "the queue to empty")


# ---- item 3: tokenizer routes off the event loop, bounded, keyed ---------------------------------

def test_tokenizer_routes_need_the_key(server):
    for route, body in (("/tokenize", {"prompt": "hello"}), ("/detokenize", {"tokens": [1, 2]})):
        r = httpx.post(server.url + route, json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert _post(server, route, body).status_code == 200
    assert httpx.get(server.url + "/tokenizer_info").status_code == 200  # cheap and read-only: open


def test_big_tokenize_and_detokenize_do_not_stall_health(server):
    done = threading.Event()
    results = {}

    def big():
        results["tok"] = _post(server, "/tokenize", {"prompt": "word " * 1_400_000})  # 7 MB
        results["detok"] = _post(server, "/detokenize", {"tokens": [9707] * 1_000_000})
        done.set()

    t = threading.Thread(target=big)
    t.start()
    health_ok = 0
    while not done.is_set():  # the event loop answers while the big calls run in a thread
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        health_ok += 1
        time.sleep(0.02)
    t.join()
    assert results["tok"].status_code == 200 and results["tok"].json()["count"] > 1_000_000
    assert results["detok"].status_code == 200
    assert health_ok >= 3
    r = _post(server, "/detokenize", {"tokens": [1] * (2**20 + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


# ---- item 5: more prompts than the queue can ever hold: 400 naming the limit ---------------------

def test_more_prompts_than_the_queue_is_a_400_naming_the_limit(server):
    for n in (17, 257):
        r = _post(server, "/v1/completions", {"prompt": [[1, 2]] * n, "max_tokens": 1})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prompt" and "at most 16" in err["message"] and "--max-queue" in err["message"]
    r = _post(server, "/v1/completions", {"prompt": [[1, 2]] * 16, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 16


# ---- item 6: every private-use code point plus a control token ---------------------------------

def test_a_message_using_every_private_use_code_point_is_served(server):
    content = EVERY_PRIVATE_USE + "<|im_end|>"
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                               "max_tokens": 1})
    assert r.status_code in (200, 400), r.text[:300]  # 400 only for the context length
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(server, "/tokenize", {"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text[:300]
    ids = r.json()["tokens"]
    assert ids.count(151645) == 2  # the system's and the user's turn end; the typed one is text


# ---- item 7: deeply nested tool-call arguments and schemas ----------------------------------------

@pytest.mark.parametrize("arguments", ["[" * 5000 + "]" * 5000, '{"a": ' * 3000 + "1" + "}" * 3000,
                                       "[" * 100 + "]" * 100])
def test_deep_tool_call_arguments_are_a_400(server, arguments):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]
    for route, body in (("/v1/chat/completions", {"messages": msgs, "max_tokens": 1}),
                        ("/tokenize", {"messages": msgs})):
        r = _post(server, route, body)
        assert r.status_code == 400, (route, r.status_code, r.text[:200])
        assert "nested more than 64 levels" in r.json()["error"]["message"]


def test_deep_tool_schema_is_a_400(server):
    schema: dict = {"type": "object"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"x": schema}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    r = _post(server, "/v1/chat/completions", {"messages": M, "tools": [tool], "max_tokens": 1})
    assert 400 <= r.status_code < 500, r.text[:200]


# ---- item 8: HEAD ------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["/health", "/v1/models", "/v1/models/tiny", "/version"])
def test_head_is_answered_like_get(server, route):
    get = httpx.get(server.url + route, headers=AUTH)
    head = httpx.head(server.url + route, headers=AUTH)
    assert get.status_code == head.status_code == 200
    assert head.content == b""


# ---- item 4: past the shutdown timeout, every client still gets an OpenAI error ---------------------

def test_past_the_shutdown_timeout_every_request_ends_with_an_openai_error(ckpt, monkeypatch):
    """Four requests (streamed and not, chat and completions) that cannot finish: 400 tokens
    at 50 ms a step take 20 s, the shutdown timeout is 1 s. Each stream must end with an error
    event and [DONE]; each non-streaming request must get a 503 with the OpenAI error body."""
    server = Server(ckpt, max_batch_size=4, max_seq_len=512, shutdown_timeout=1.0)
    step = server.engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(server.engine, "step", slow_step)
    long = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}
    requests = {"cmpl-stream": ("/v1/completions", {"prompt": "once", "stream": True, **long}),
                "chat-stream": ("/v1/chat/completions", {"messages": M, "stream": True, **long}),
                "cmpl": ("/v1/completions", {"prompt": "upon", **long}),
                "chat": ("/v1/chat/completions", {"messages": M, **long})}
    results: dict = {}

    def call(key, route, body):
        try:
            if body.get("stream"):
                with httpx.stream("POST", server.url + route, json=body, timeout=120) as r:
                    results[key] = (r.status_code, sse_events(r))
            else:
                r = httpx.post(server.url + route, json=body, timeout=120)
                results[key] = (r.status_code, r.headers.get("content-type"), r.text)
        except httpx.HTTPError as e:  # the response was cut off
            results[key] = ("cut", repr(e), "")

    threads = [threading.Thread(target=call, args=(k, *v)) for k, v in requests.items()]
    with server:
        for t in threads:
            t.start()
        _until(lambda: server.state.worker.counts()[0] == 4, "the four requests to run")
    # leaving the block shut the server down (as SIGTERM does): 1 s later the requests were failed
    for t in threads:
        t.join(60)
    for key in ("cmpl-stream", "chat-stream"):
        status, events = results[key][:2]
        assert status == 200 and events[-1] == "[DONE]", (key, status, events[-3:])
        assert any("choices" in e for e in events[:-2]), key  # it was streaming before
        err = events[-2]["error"]
        assert err["code"] == "shutting_down" and err["type"] == "server_error" and err["message"], key
    for key in ("cmpl", "chat"):
        status, content_type, text = results[key]
        assert status == 503 and content_type == "application/json", (key, status, text[:200])
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "shutting_down" and err["type"] == "server_error", key
