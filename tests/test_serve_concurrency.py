"""Many clients at once: batch-composition invariance, continuous batching, cancellation,
graceful shutdown.

- 16 clients x 8 requests (chat and completions, streamed and not, n = 1 and 2, greedy and
  seeded sampling, prompts long enough to be prefilled in several pieces): every answer is
  token-for-token the answer the same request gets alone (llama.cpp's
  test_consistent_result_different_batch_size, at our scale).
- A short request finishes while a long one keeps streaming (joined between decode steps).
- 32 streams dropped after their first chunk: within 2 s /metrics shows nothing running or
  waiting (vLLM's abort-metrics test), and the next request is served.
- `qwen25 serve` in a subprocess (with --rope-scaling yarn:2, whose context it must
  enforce): SIGTERM lets in-flight streams finish, refuses new requests, exits 0.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from serve_support import Server, free_port, random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("serve_conc"), seed=3, max_position_embeddings=256)


def request_spec(client: int, i: int) -> dict:
    k = client * 8 + i
    text = " ".join(WORDS[(k + j) % len(WORDS)] for j in range(3 + (k * 7) % 40))
    spec = {"kind": k % 4, "max_tokens": 4 + (k * 5) % 20, "n": 2 if k % 5 == 0 else 1, "text": text,
            "temperature": 0.0}
    if k % 3 == 0:
        spec.update(temperature=0.9, seed=k)  # seeded sampling must not depend on the batch either
    return spec


def run(client: openai.OpenAI, spec: dict):
    """(texts, log-probabilities and finish reason per choice, total tokens) of one request.
    The log-probabilities are compared exactly: equal floats mean the same computation."""
    common = dict(model="tiny", max_tokens=spec["max_tokens"], n=spec["n"], temperature=spec["temperature"],
                  seed=spec.get("seed"))
    chat = spec["kind"] in (0, 1)
    messages = [{"role": "user", "content": spec["text"]}]
    if chat:
        common.update(messages=messages, logprobs=True, top_logprobs=2)
    else:
        common.update(prompt=spec["text"], logprobs=2)
    create = client.chat.completions.create if chat else client.completions.create
    n = spec["n"]
    texts, logprobs, reasons, total = [""] * n, [[] for _ in range(n)], [None] * n, None
    if spec["kind"] in (0, 2):
        r = create(**common)
        for c in r.choices:
            texts[c.index] = c.message.content if chat else c.text
            logprobs[c.index] = ([(t.logprob, [a.logprob for a in t.top_logprobs]) for t in c.logprobs.content]
                                 if chat else c.logprobs.token_logprobs)
            reasons[c.index] = c.finish_reason
        return texts, logprobs, reasons, r.usage.total_tokens
    for chunk in create(stream=True, stream_options={"include_usage": True}, **common):
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if chat else c.text
            if c.logprobs is not None:
                logprobs[c.index] += ([(t.logprob, [a.logprob for a in t.top_logprobs]) for t in c.logprobs.content]
                                      if chat else c.logprobs.token_logprobs)
            reasons[c.index] = c.finish_reason or reasons[c.index]
        if chunk.usage is not None:
            total = chunk.usage.total_tokens
    return texts, logprobs, reasons, total


@pytest.mark.slow
def test_sixteen_clients_get_what_each_request_gets_alone(ckpt):
    with Server(ckpt, max_batch_size=8, max_seq_len=256, prefill_chunk=16) as server:
        specs = [[request_spec(c, i) for i in range(8)] for c in range(16)]
        client = server.client()
        alone = [[run(client, s) for s in row] for row in specs]

        def one_client(row):
            c = server.client()
            return [run(c, s) for s in row]

        busiest, done = [0], threading.Event()

        def watch():  # how many requests shared the engine at once
            while not done.is_set():
                busiest[0] = max(busiest[0], server.metric("qwen25_num_requests_running"))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(one_client, specs))
        done.set()
        watcher.join()
        assert server.metric("qwen25_num_requests_running") == 0
        assert busiest[0] >= 4
    mismatches = [(c, i) for c in range(16) for i in range(8) if alone[c][i] != together[c][i]]
    assert not mismatches, [(specs[c][i], alone[c][i], together[c][i]) for c, i in mismatches[:3]]
    assert len({t for row in together for r in row for t in r[0]}) > 64  # varied answers, not one repeated


def test_a_short_request_joins_a_running_batch(ckpt):
    with Server(ckpt, max_batch_size=2, max_seq_len=4096) as server:
        client = server.client()
        stream = client.completions.create(model="tiny", prompt="tell me a long story", max_tokens=3000, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        next(chunks)  # the long one is decoding
        r = client.completions.create(model="tiny", prompt="short", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert server.metric("qwen25_num_requests_running") == 1  # the long stream is still going
        stream.close()


def test_dropped_streams_free_their_work_within_two_seconds(ckpt):
    with Server(ckpt, max_batch_size=8, max_seq_len=4096) as server:
        aborted_before = server.metric("qwen25_request_aborted_total")
        started = threading.Barrier(33)

        def drop_after_first_chunk():
            with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 4000,
                                    "stream": True, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
                started.wait()
            # leaving the block closes the connection

        threads = [threading.Thread(target=drop_after_first_chunk) for _ in range(32)]
        for t in threads:
            t.start()
        started.wait()
        for t in threads:
            t.join()
        closed = time.monotonic()
        while time.monotonic() - closed < 2.0:
            if server.metric("qwen25_num_requests_running") == 0 and server.metric("qwen25_num_requests_waiting") == 0:
                break
            time.sleep(0.02)
        assert server.metric("qwen25_num_requests_running") == 0
        assert server.metric("qwen25_num_requests_waiting") == 0
        assert time.monotonic() - closed < 2.0
        assert server.metric("qwen25_request_aborted_total") - aborted_before == 32
        r = server.client(timeout=5).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                             max_tokens=4)
        assert r.usage.completion_tokens >= 1


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


@pytest.mark.slow
def test_cli_server_enforces_the_yarn_context_and_shuts_down_gracefully(ckpt):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "qwen25", "serve", str(ckpt), "--port", str(port),
                             "--max-batch-size", "4", "--rope-scaling", "yarn:2", "--served-model-name", "tiny",
                             "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert client.models.list().data[0].model_extra["max_model_len"] == 512  # 2 x 256
        r = client.completions.create(model="tiny", prompt=[17] * 400, max_tokens=5)  # past 256: YaRN's range
        assert r.usage.prompt_tokens == 400
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=[17] * 510, max_tokens=5)
        assert e.value.body["code"] == "context_length_exceeded"

        results, first = {}, threading.Barrier(5)

        def stream(i):
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            text, reasons, chunks = "", [], 0
            for chunk in c.completions.create(model="tiny", prompt=f"story {i}", max_tokens=200, stream=True,
                                              extra_body={"ignore_eos": True}):
                chunks += 1
                if chunks == 2:
                    first.wait()
                for ch in chunk.choices:
                    text += ch.text
                    reasons += [ch.finish_reason] if ch.finish_reason else []
            results[i] = (text, reasons)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        first.wait()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10).completions.create(
                model="tiny", prompt="late", max_tokens=2)
        for t in threads:
            t.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(results) == [0, 1, 2, 3]
    assert all(reasons == ["length"] and text for text, reasons in results.values())
