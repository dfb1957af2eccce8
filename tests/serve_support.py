"""Shared by the server tests: tiny checkpoints, a scripted model, servers on 127.0.0.1.

- `random_checkpoint(path)`: a tiny Qwen2 model (2 layers, hidden 64, the real 151,936-row
  vocabulary) with noisy weights, so greedy decoding gives varied tokens, saved with
  `qwen25.save_model` plus the built-in tokenizer (`save_pretrained`).
- `scripted_checkpoint(path, replies)`: a real (one-layer) model whose greedy reply to
  given prompts is given text: its next token is a lookup on the last 4 tokens, built
  from attention heads that copy the previous tokens and a least-squares lm_head. This is
  how the tests get exact tool-call text out of a model through the real engine.
- `Server`: uvicorn in a thread (the CLI's `build_server`, shutdown timeout included),
  serving a `ServerState`; `.client()` is the official `openai` client with max_retries=0
  (a retried 5xx would hide a bug).
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

from qwen25 import Engine, ModelConfig, build_model, load_model, load_tokenizer, save_model
from qwen25.serve import ServerConfig, ServerState
from qwen25.serve.app import build_server

IM_END = 151645
VOCAB = 151936


def tiny_config(**changes) -> ModelConfig:
    fields = {"vocab_size": VOCAB, "max_position_embeddings": 512, "tie_word_embeddings": False, **changes}
    return ModelConfig.preset("tiny").replace(**fields)


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


SCRIPT_WINDOW = 3  # a scripted model's next token depends on the current token and the 3 before it
_BLOCK = 32  # residual dims per attended token


@functools.lru_cache(maxsize=1)
def _piece_table(tokenizer) -> tuple[dict[bytes, int], int]:
    table: dict[bytes, int] = {}
    for i in range(tokenizer.num_regular_tokens):
        table.setdefault(tokenizer.id_to_bytes(i), i)
    for t in tokenizer.added_tokens:
        if t.content in ("<tool_call>", "</tool_call>"):
            table[t.content.encode()] = t.id
    return table, max(map(len, table))


def spell(text: str, context: list[int], tokenizer, fixed: dict) -> list[int]:
    """Token ids that decode to `text` such that, after `context`, every window of
    SCRIPT_WINDOW + 1 tokens is followed by one token only (consistent with `fixed`, which
    is updated): dynamic programming over (position, window), longest pieces first; a
    window that repeats within the text with two successors is banned and the search rerun."""
    table, longest = _piece_table(tokenizer)
    data = text.encode()
    start = tuple([None] * (SCRIPT_WINDOW + 1) + list(context))[-(SCRIPT_WINDOW + 1):]
    banned: set = set()
    for _ in range(1000):
        @functools.lru_cache(maxsize=None)
        def search(pos: int, window: tuple):
            if pos == len(data):
                return () if fixed.get(window, IM_END) == IM_END and (window, IM_END) not in banned else None
            for size in range(min(longest, len(data) - pos), 0, -1):
                t = table.get(data[pos:pos + size])
                if t is None or fixed.get(window, t) != t or (window, t) in banned:
                    continue
                rest = search(pos + size, window[1:] + (t,))
                if rest is not None:
                    return (t,) + rest
            return None

        ids = search(0, start)
        if ids is None:
            raise ValueError(f"cannot spell {text!r} consistently")
        seen, window, conflict = {}, start, None
        for t in ids + (IM_END,):
            if seen.setdefault(window, t) != t:
                conflict = (window, t)
                break
            window = window[1:] + (t,)
        if conflict is None:
            fixed.update(seen)
            return list(ids)
        banned.add(conflict)
    raise ValueError(f"cannot spell {text!r}: too many conflicts")


def scripted_checkpoint(path: Path, replies: list[tuple[list[int], str]], seed: int = 0) -> Path:
    """A checkpoint whose greedy reply to each prompt is the given text, then <|im_end|>.

    One layer. Attention heads 1..3 copy the (normed) embeddings of the tokens 1, 2 and 3
    positions back into their own 32 residual dims (constant query/key biases whose RoPE
    phase peaks at that distance), so the residual holds the last 4 tokens; a random MLP
    makes the final hidden state a generic function of that window; the lm_head is solved
    by least squares so that each window of the replies scores its successor 60 and every
    other token 0. Replies that share a prompt's last 4 tokens must agree.
    """
    tokenizer = load_tokenizer("qwen2.5")
    K, D = SCRIPT_WINDOW, _BLOCK
    cfg = ModelConfig(hidden_size=D * (K + 1), intermediate_size=512, num_hidden_layers=1, num_attention_heads=K + 1,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=100.0,
                      tie_word_embeddings=False)
    fixed: dict = {}
    chains = [(list(prompt), spell(text, prompt, tokenizer, fixed)) for prompt, text in replies]
    model = build_model(cfg, init=False)
    g = torch.Generator().manual_seed(seed)
    H, inter, A = cfg.hidden_size, cfg.intermediate_size, 16.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :D] = torch.randn(VOCAB, D, generator=g)
        layer = model.model.layers[0]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        att = layer.self_attn
        theta = cfg.rope_theta ** (-torch.arange(D // 2, dtype=torch.float64) * 2 / D)
        att.k_proj.bias[:D // 2] = A
        att.v_proj.weight[:, :D] = torch.eye(D)
        for d in range(1, K + 1):  # score(query m, key n) = A^2 sum_i cos((m - n - d) theta_i) / sqrt(D)
            q = torch.cat([A * torch.cos(d * theta), -A * torch.sin(d * theta)])
            att.q_proj.bias[d * D:(d + 1) * D] = q.float()
            att.o_proj.weight[d * D:(d + 1) * D, d * D:(d + 1) * D] = torch.eye(D)
        mlp = layer.mlp
        mlp.gate_proj.weight.copy_(torch.randn(inter, H, generator=g) * 3 / H ** 0.5)
        mlp.up_proj.weight.copy_(torch.randn(inter, H, generator=g) / H ** 0.5)
        mlp.down_proj.weight.copy_(torch.randn(H, inter, generator=g) * 3 / inter ** 0.5)
        feats, targets = [], []
        for prompt, ids in chains:
            seq = prompt[-(K + 1):] + ids
            h, _ = model.hidden_states(torch.tensor([seq]))
            for i in range(K, len(seq)):
                feats.append(h[0, i].double())
                targets.append(seq[i + 1] if i + 1 < len(seq) else IM_END)
        used = sorted(set(targets))
        Y = torch.zeros(len(targets), len(used), dtype=torch.float64)
        for i, t in enumerate(targets):
            Y[i, used.index(t)] = 60.0
        W = torch.linalg.lstsq(torch.stack(feats), Y).solution
        model.lm_head.weight[used] = W.T.float()
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
                 served_model_name: str = "tiny", prefill_chunk: int = 512, max_body_bytes: int = 2**20,
                 shutdown_timeout: float = 30.0, **engine_kw):
        self.path = Path(path)
        self.model = load_model(path)
        self.tokenizer = load_tokenizer(path)
        self.engine = Engine(self.model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             prefill_chunk=prefill_chunk, hugepages=False, **engine_kw)
        self.state = ServerState(self.engine, self.tokenizer,
                                 ServerConfig(served_model_name=served_model_name, api_keys=tuple(api_keys),
                                              max_queue=max_queue, max_body_bytes=max_body_bytes))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the server `qwen25 serve` runs (its shutdown included), without its signal handlers
        self._server = build_server(self.state, "127.0.0.1", self.port, shutdown_timeout, log_level="warning")
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
