"""What every route shares: the server's state and the request -> engine translation.

- `ServerConfig`: the deployment's choices (names, keys, limits).
- `ServerState`: engine, tokenizer, worker, metrics, config and the derived limits.
- `sampling_params(...)`: request fields over the model's generation_config.json defaults.
- `check_context(...)`: the prompt and max_tokens against the context (400
  `context_length_exceeded`, never a silent truncation).
- `job_updates(...)`: submit a job and iterate over its updates; leaving the loop early
  (client gone, error) cancels the job in the engine.
- `TokenTexts`: a token id's text and bytes, as logprobs show them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache

from starlette.requests import Request as HTTPRequest

from qwen25.engine import Engine, SamplingParams
from qwen25.engine.engine import default_stop_ids
from qwen25.engine.text import sampling_defaults
from qwen25.serve.errors import APIError, context_length_exceeded, invalid, model_not_found
from qwen25.serve.metrics import Metrics
from qwen25.serve.schemas import _Sampling
from qwen25.serve.worker import EngineWorker, Job, JobFailed, PromptScores, SampleUpdate

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class ServerConfig:
    served_model_name: str = "qwen25"  # the id clients pass as "model"
    model_path: str = ""  # shown as the model's root in /v1/models
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_queue: int = 256  # requests waiting for a slot before 429
    max_body_bytes: int = 32 * 2**20  # larger bodies get 413


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object
    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    worker: EngineWorker | None = None
    draining: bool = False  # set on SIGTERM: new generation requests get 503
    started: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.worker is None:
            self.worker = EngineWorker(self.engine, self.tokenizer, self.metrics, self.config.max_queue)
        model = self.engine.model
        self.defaults = sampling_defaults(model)  # generation_config.json: temperature, top_p, ...
        # Stop on the checkpoint's eos ids and on the tokenizer's end tokens (<|im_end|>,
        # <|endoftext|>): a chat reply must end at <|im_end|> even when a folder has no
        # generation_config.json.
        self.stop_ids = tuple(sorted(set(default_stop_ids(model)) | set(self.tokenizer.stop_token_ids)))
        self.fingerprint = f"fp_qwen25_{self.engine.decode_path}"
        self.texts = TokenTexts(self.tokenizer)

    @property
    def max_model_len(self) -> int:
        """Prompt + generated tokens a request may use: the engine's context, which the CLI
        chose with `qwen25.model.context.engine_context` (one number, one owner)."""
        return self.engine.max_seq_len

    def resolve_model(self, name: str | None) -> str:
        if name is not None and name != self.config.served_model_name:
            raise model_not_found(name)
        return self.config.served_model_name


def check_context(state: ServerState, prompt_tokens: int, max_tokens: int | None, prompt_param: str,
                  max_tokens_param: str = "max_tokens") -> int:
    """The number of tokens to generate at most; 400 context_length_exceeded when the prompt,
    or the prompt plus an explicit max_tokens, does not fit. max_tokens None: fill the context
    (capped by generation_config's max_new_tokens)."""
    limit = state.max_model_len
    if prompt_tokens >= limit:
        raise context_length_exceeded(limit, prompt_tokens, None, prompt_param)
    if max_tokens is None:
        room = limit - prompt_tokens
        default = state.defaults.get("max_new_tokens")
        return min(room, default) if isinstance(default, int) and default > 0 else room
    if prompt_tokens + max_tokens > limit:
        raise context_length_exceeded(limit, prompt_tokens, max_tokens, max_tokens_param)
    return max_tokens


def sampling_params(state: ServerState, req: _Sampling, max_new_tokens: int, top_logprobs: int) -> SamplingParams:
    """The engine's SamplingParams: the request's values, else the model's defaults, else
    OpenAI's (temperature 1, top_p 1)."""
    if req.logit_bias:
        raise invalid("logit_bias is not supported by this server; leave it out", param="logit_bias")
    d = state.defaults

    def pick(name: str, fallback):
        value = getattr(req, name)
        return value if value is not None else d.get(name, fallback)

    top_k = pick("top_k", 0)
    seed = None if req.seed is None else req.seed % 2**63  # sample i uses seed + i
    return SamplingParams(
        max_new_tokens=max(1, max_new_tokens), temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)), top_k=0 if top_k < 0 else int(top_k), min_p=float(pick("min_p", 0.0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=float(req.presence_penalty or 0.0), frequency_penalty=float(req.frequency_penalty or 0.0),
        stop_token_ids=() if req.ignore_eos else state.stop_ids, seed=seed, logprobs=top_logprobs, n=req.n)


def check_n(state: ServerState, n: int) -> None:
    if n > state.engine.max_batch_size:
        raise invalid(f"n={n} samples need as many batch slots, but the server runs with max batch size "
                      f"{state.engine.max_batch_size}; lower n", param="n")


def check_accepting(state: ServerState) -> None:
    if state.draining or not state.worker.alive:
        raise APIError(503, "The server is shutting down and accepts no new requests."
                       if state.draining else "The engine is not running; see the server log.",
                       code="service_unavailable")


def submit(state: ServerState, job: Job) -> None:
    """Queue `job` (raises 429 when the queue is full, 503 when shutting down, 400 when it
    holds more prompts than the queue can ever take: retrying that could never succeed)."""
    check_accepting(state)
    limit = state.worker.max_queue
    if len(job.prompts) > limit:
        raise invalid(f"the request holds {len(job.prompts)} prompts; this server queues at most {limit} "
                      "(--max-queue): send them in several requests", param="prompt")
    state.worker.submit(job, asyncio.get_running_loop())


async def job_updates(state: ServerState, job: Job, http: HTTPRequest | None = None,
                      ) -> AsyncIterator[PromptScores | SampleUpdate]:
    """Yield a submitted job's updates until every choice has finished.

    With `http` given (non-streaming requests), the client connection is polled so that a
    client that hangs up cancels the work. Raises the job's APIError if it failed. Leaving
    the iteration early, by error, cancellation or `aclose`, cancels the job.
    """
    remaining = job.choices
    try:
        while remaining:
            if http is None:
                item = await job.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
            if isinstance(item, JobFailed):
                raise item.error
            if isinstance(item, PromptScores):
                yield item
                continue
            for update in item:
                if update.finish_reason is not None:
                    remaining -= 1
                yield update
    finally:
        if remaining:
            state.worker.cancel(job)


class TokenTexts:
    """A token's text (its UTF-8 decoding; U+FFFD for part of a character) and its bytes."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @lru_cache(maxsize=65536)
    def text(self, token_id: int) -> str:
        return self._tok.decode([token_id])

    @lru_cache(maxsize=65536)
    def bytes(self, token_id: int) -> list[int]:
        try:
            return list(self._tok.id_to_bytes(token_id))
        except KeyError:  # an id past the tokenizer (the model's padding rows)
            return []
