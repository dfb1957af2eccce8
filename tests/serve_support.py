"""Shared by the server tests: tiny checkpoints, a scripted model, servers on 127.0.0.1.

- `random_checkpoint(path)`: a tiny Qwen2 model (2 layers, hidden 64, the real 151,936-row
  vocabulary) with noisy weights, so greedy decoding gives varied tokens, saved with
  `qwen25.save_model` plus the built-in tokenizer (`save_pretrained`).
- `scripted_checkpoint(path, chains)`: a model whose greedy output is fixed text. Attention
  and MLP outputs are zero, so the logits depend on the last token only, and the lm_head
  maps each token of a chain to the next one (then <|im_end|>). The chains' tokens are all
  distinct, so one model can hold several chains keyed by their first token. This is how
  the tests get tool-call and stop-string text out of a real model through the real engine.
- `Server`: uvicorn in a thread, serving a `ServerState`; `.client()` is the official
  `openai` client with max_retries=0 (a retried 5xx would hide a bug).
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import torch
import uvicorn

from qwen25 import Engine, ModelConfig, build_model, load_model, load_tokenizer, save_model
from qwen25.serve import ServerConfig, ServerState, create_app

IM_END = 151645
VOCAB = 151936


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=VOCAB, max_position_embeddings=512,
                                              tie_word_embeddings=False, **changes)


@functools.lru_cache(maxsize=1)
def _tokenizer_files() -> Path:
    """The built-in tokenizer saved once per process (writing it takes seconds)."""
    folder = Path(tempfile.mkdtemp(prefix="qwen25-tok-"))
    load_tokenizer("qwen2.5").save_pretrained(folder)
    return folder


def add_tokenizer(path: Path) -> None:
    for f in _tokenizer_files().iterdir():
        shutil.copy(f, Path(path) / f.name)


def random_checkpoint(path: Path, seed: int = 0, generation_config: dict | None = None, **changes) -> Path:
    model = build_model(tiny_config(**changes), init=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.15
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    save_model(model, path)
    add_tokenizer(path)
    if generation_config is not None:
        (Path(path) / "generation_config.json").write_text(json.dumps(generation_config))
    return Path(path)


def spell(text: str, tokenizer, used: set[int]) -> list[int]:
    """Token ids whose decoding is `text`, none in `used` (which is updated): depth-first,
    longest pieces first. Regular tokens plus <tool_call> and </tool_call>."""
    table: dict[bytes, int] = {}
    for i in range(tokenizer.num_regular_tokens):
        table.setdefault(tokenizer.id_to_bytes(i), i)
    for t in tokenizer.added_tokens:
        if t.content in ("<tool_call>", "</tool_call>"):
            table[t.content.encode()] = t.id
    data = text.encode()
    longest = max(len(b) for b in table)

    def search(pos: int) -> list[int] | None:
        if pos == len(data):
            return []
        for size in range(min(longest, len(data) - pos), 0, -1):
            tid = table.get(data[pos:pos + size])
            if tid is None or tid in used:
                continue
            used.add(tid)
            rest = search(pos + size)
            if rest is not None:
                return [tid] + rest
            used.discard(tid)
        return None

    ids = search(0)
    if ids is None:
        raise ValueError(f"cannot spell {text!r} with unused tokens")
    return ids


def scripted_checkpoint(path: Path, chains: dict[int, list[int]], seed: int = 0) -> Path:
    """`chains`: first token -> the ids greedy decoding must produce after it (then
    <|im_end|>). All ids across chains must be distinct."""
    cfg = tiny_config()
    model = build_model(cfg, init=False)
    g = torch.Generator().manual_seed(seed)
    H = cfg.hidden_size
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for start, ids in chains.items():
            seq = [start] + ids
            for a, b in zip(seq, seq[1:] + [IM_END]):
                e = torch.randn(H, generator=g)
                emb[a] = e
                model.lm_head.weight[b] += 10.0 * e / e.norm()
    save_model(model, path)
    add_tokenizer(path)
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A live server on 127.0.0.1 (uvicorn in a thread) for the checkpoint at `path`."""

    def __init__(self, path: Path, max_batch_size: int = 8, max_seq_len: int = 256, api_keys=(), max_queue=256,
                 served_model_name: str = "tiny", prefill_chunk: int = 512, **engine_kw):
        self.model = load_model(path)
        self.tokenizer = load_tokenizer(path)
        self.engine = Engine(self.model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             prefill_chunk=prefill_chunk, hugepages=False, **engine_kw)
        self.state = ServerState(self.engine, self.tokenizer,
                                 ServerConfig(served_model_name=served_model_name, api_keys=tuple(api_keys),
                                              max_queue=max_queue))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def client(self, api_key: str = "none", timeout: float = 60.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def post(self, route: str, body, **kw) -> httpx.Response:
        kw.setdefault("timeout", 60.0)
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + route, content=body, **kw)
        return httpx.post(self.url + route, json=body, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a streamed response: parsed JSON, or the string "[DONE]"."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
