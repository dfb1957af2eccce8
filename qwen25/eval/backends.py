"""Where evaluation requests go: the in-process engine or an OpenAI-compatible server.

Both backends answer the same two questions, so a task never knows which one runs it:

- `loglik(pairs, chat)`: log p(continuation | context) for (context, continuation) texts;
- `generate(prompts, ...)`: completions of base prompts (text) or conversations (chat).

`LocalBackend` scores on the model with each distinct context computed once
(`loglik.loglikelihoods`) and generates on the batched `Engine` (continuous batching, stop
strings end a sample early); in both, the prefix the prompts share (few-shot examples) is
prefilled once. `ServerBackend` sends /v1/completions with echo + logprobs
(max_tokens 0) and splits the echoed tokens at the context's length by their text offsets,
and /v1/chat/completions for conversations; requests run concurrently so the server can
batch them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from qwen25.engine.engine import Engine
from qwen25.engine.text import TextStream
from qwen25.errors import UserError
from qwen25.eval.loglik import MIN_SHARED_PREFIX, LogLik, encode_pair, loglikelihoods, shared_prefix


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class LocalBackend:
    """A model + tokenizer in this process."""

    kind = "local"

    def __init__(self, model, tokenizer, batch_size: int = 8, progress: Callable[[int], None] | None = None,
                 share_prefix: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.share_prefix = share_prefix  # compute the prompts' common prefix (the shots) once
        self.limit = model.config.max_position_embeddings
        self.progress = progress

    def check_chat(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("--chat needs a chat template, and this tokenizer has none; drop --chat "
                            "(base-model prompts) or pass --tokenizer with a template")

    def chat_text(self, messages: Sequence[dict]) -> str:
        self.check_chat()
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def _encode(self, chat: bool):
        return (lambda s: self.tokenizer.encode(s, allow_special=True)) if chat else self.tokenizer.encode

    def loglik(self, pairs: Sequence[tuple[str, str]], chat: bool = False) -> list[LogLik]:
        enc = self._encode(chat)
        reqs = [encode_pair(enc, c, x, move_space=not chat) for c, x in pairs]
        return loglikelihoods(self.model, reqs, progress=self.progress, share_prefix=self.share_prefix)

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int, n: int = 1,
                 temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[list[str]]:
        """n completions per prompt: base prompts are text, chat prompts message lists."""
        enc = self._encode(chat)
        if chat:
            prompts = [self.chat_text(m) for m in prompts]
        ids = []
        for p in prompts:
            t = enc(p)
            room = self.limit - max_new_tokens
            if room < 1:
                raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                                f"model's context of {self.limit}")
            ids.append(t[-room:])  # lm-eval keeps the end of an over-long prompt too
        longest = max(map(len, ids)) + max_new_tokens
        engine = Engine(self.model, max_batch_size=max(self.batch_size, n), max_seq_len=min(self.limit, longest),
                        hugepages=False)
        shared = shared_prefix(ids) if self.share_prefix else 0
        if shared >= MIN_SHARED_PREFIX:  # the few-shot examples: prefilled once for every prompt
            engine.share_prefix(ids[0][:shared])
        return self._drive(engine, ids, stop, max_new_tokens, n, temperature, seed)

    def _drive(self, engine: Engine, ids, stop, max_new_tokens, n, temperature, seed) -> list[list[str]]:
        """Keep the engine's slots full: add prompts as others finish (the public add/step/
        cancel API); a sample whose text reaches a stop string is cut and its slot freed."""
        out: list[list[str]] = [[""] * n for _ in ids]
        pending = list(range(len(ids)))[::-1]
        live: dict[int, tuple[int, object, list[TextStream], list[bool]]] = {}
        while pending or live:
            while pending and sum(r.params.n for _, r, _, _ in live.values()) + n <= engine.max_batch_size:
                i = pending.pop()
                req = engine.add(ids[i], max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed + i, n=n)
                live[id(req)] = (i, req, [TextStream(self.tokenizer, stop) for _ in range(n)], [False] * n)
            for ev in engine.step():
                entry = live.get(id(ev.request))
                if entry is None:
                    continue
                i, req, streams, done = entry
                if done[ev.index]:
                    continue
                ts = streams[ev.index]
                ts.push(ev.token)
                if ts.stopped or ev.finished:
                    ts.finish()
                    done[ev.index] = True
            for key, (i, req, streams, done) in list(live.items()):
                if all(done) or req.finished:
                    if not req.finished:
                        engine.cancel(req)
                    for j, ts in enumerate(streams):
                        if not done[j]:
                            ts.finish()
                        out[i][j] = ts.text
                    del live[key]
                    if self.progress:
                        self.progress(1)
        return out


class ServerBackend:
    """An OpenAI-compatible endpoint (ours, vLLM, llama.cpp's server)."""

    kind = "server"

    def __init__(self, url: str, model: str | None = None, tokenizer=None, concurrency: int = 8,
                 timeout_s: float = 600.0, progress: Callable[[int], None] | None = None):
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.tokenizer, self.concurrency, self.timeout_s, self.progress = tokenizer, concurrency, timeout_s, progress
        self.model = model or self._first_model()

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise UserError(f"server {self.base}{path} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot reach the server at {self.base} ({e}); start it or fix --server") from None

    def _first_model(self) -> str:
        try:
            with urllib.request.urlopen(self.base + "/models", timeout=30) as r:
                data = json.loads(r.read())["data"]
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            raise UserError(f"cannot list models at {self.base}/models ({e}); check --server") from None
        if not data:
            raise UserError(f"the server at {self.base} serves no model")
        return data[0]["id"]

    def check_chat(self) -> None:
        pass  # the server applies its own template (an error there is reported as such)

    def chat_text(self, messages: Sequence[dict]) -> str:
        if self.tokenizer is None:
            raise UserError("--chat multiple-choice scoring on --server renders the template locally; "
                            "pass --tokenizer (the model's tokenizer folder)")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def _map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as pool:
            for r in pool.map(fn, items):
                if self.progress:
                    self.progress(1)
                yield r

    def _score(self, pair: tuple[str, str], chat: bool = False) -> LogLik:
        ctx, cont = pair
        n_spaces = 0 if chat else len(ctx) - len(ctx.rstrip())  # lm-eval's rule, as in encode_pair
        split = len(ctx) - n_spaces
        r = self._post("/completions", {"model": self.model, "prompt": ctx + cont, "echo": True,
                                        "max_tokens": 0, "logprobs": 1, "temperature": 0})
        lp = r["choices"][0]["logprobs"]
        total, greedy, count = 0.0, True, 0
        for tok, off, val, top in zip(lp["tokens"], lp["text_offset"], lp["token_logprobs"], lp["top_logprobs"]):
            if off + len(tok) <= split:  # wholly inside the context
                continue
            if val is None:
                raise UserError("the server returned no log-probability for a continuation token")
            total += val
            count += 1
            if top:
                greedy &= val >= max(top.values()) - 1e-6
        return LogLik(total, greedy, count)

    def loglik(self, pairs: Sequence[tuple[str, str]], chat: bool = False) -> list[LogLik]:
        return list(self._map(lambda p: self._score(p, chat), pairs))

    def generate(self, prompts: Sequence, stop: Sequence[str], max_new_tokens: int, n: int = 1,
                 temperature: float = 0.0, seed: int = 0, chat: bool = False) -> list[list[str]]:
        def one(item):
            i, p = item
            body = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature, "n": n,
                    "seed": seed + i}
            if stop:
                body["stop"] = list(stop)[:4]  # the OpenAI API takes up to 4; the rest are cut here
            if chat:
                r = self._post("/chat/completions", {**body, "messages": list(p)})
                texts = [c["message"].get("content") or "" for c in r["choices"]]
            else:
                r = self._post("/completions", {**body, "prompt": p})
                texts = [c["text"] for c in r["choices"]]
            return [cut_at_stop(t, stop) for t in texts]

        return list(self._map(one, list(enumerate(prompts))))
