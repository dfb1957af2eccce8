"""What an adversarial probe broke in the server (issue 21 items 1, 3, 5-8), and the general
promises behind them: a client's mistake is never a 5xx, one request never changes or fails
another's output, and the tokenizer routes neither block the event loop nor run for anyone
without the key.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serve_support import Server, random_checkpoint, sse_events

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
M = [{"role": "user", "content": "hi"}]
EVERY_PRIVATE_USE = "".join(chr(c) for c in range(0xF0000, 0x10FFFE))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = random_checkpoint(tmp_path_factory.mktemp("serve_rel"))
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
