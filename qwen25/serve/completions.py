"""POST /v1/completions: the legacy text completion API, as lm-evaluation-harness drives it.

Prompts: a string, a list of strings, a list of token ids, or a list of such lists (one
engine request each; choice index = prompt * n + sample). Text prompts are encoded with
control tokens recognised (as HF tokenizers and vLLM do), so a hand-written ChatML prompt
works. Token ids must lie in the tokenizer's vocabulary.

`echo` puts the prompt in front of the text; with `logprobs` it also scores the prompt: the
first prompt token has no log-probability (None), each later one its log p given what
precedes it. lm-eval's `local-completions` computes log-likelihoods exactly this way:
`prompt=[ids]`, `echo=true`, `logprobs=1`, `max_tokens=1`, then reads
`token_logprobs[ctxlen:-1]` and checks greediness against `max(top_logprobs[i].values())`.
`max_tokens=0` with echo scores the prompt without generating.

`logprobs` (0..20): `tokens` (each token's text), `token_logprobs`, `top_logprobs` (the k
most likely {text: logprob} per position) and `text_offset` (where each token's text starts
in the choice's text).
"""

from __future__ import annotations

import math
import secrets
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from qwen25.serve.errors import invalid
from qwen25.serve.schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage
from qwen25.serve.state import ServerState, check_context, check_n, job_updates, sampling_params, submit
from qwen25.serve.streaming import SSEResponse, event
from qwen25.serve.worker import Job, PromptScores, TokenInfo

MIN_LOGPROB = -9999.0


def encode_prompts(tokenizer, prompt) -> list[tuple[list[int], str]]:
    """The request's prompt(s) -> [(token ids, echo text)]; 400 for empty or unknown ids."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        out = [(tokenizer.encode(t, allow_special=True), t) for t in texts]
    else:
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        vocab = len(tokenizer)
        for ids in lists:
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise invalid(f"token id {bad} in the prompt is out of vocabulary (0..{vocab - 1})", param="prompt")
        out = [(list(ids), tokenizer.decode(ids)) for ids in lists]
    if any(not ids for ids, _ in out):
        raise invalid("the prompt is empty; give at least one token", param="prompt")
    return out


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else MIN_LOGPROB


class _Logprobs:
    """Accumulates one choice's legacy logprobs, with text offsets from a running decode."""

    def __init__(self, texts, k: int, decoder, base: int = 0):
        self.texts, self.k, self.decoder, self.offset = texts, k, decoder, base
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        self.tokens.append(self.texts.text(token_id))
        self.token_logprobs.append(None if logprob is None else _finite(logprob))
        if logprob is None:
            self.top.append(None)
        else:
            alts: dict[str, float] = {}
            for i, lp in (top or [])[:self.k]:
                alts.setdefault(self.texts.text(i), _finite(lp))
            self.top.append(alts)
        self.text_offset.append(self.offset)
        self.offset += len(self.decoder.push(token_id))

    def take(self) -> CompletionLogprobs:
        """Everything added since the last take (a streamed chunk's share)."""
        out = CompletionLogprobs(tokens=self.tokens, token_logprobs=self.token_logprobs, top_logprobs=self.top,
                                 text_offset=self.text_offset)
        self.tokens, self.token_logprobs, self.top, self.text_offset = [], [], [], []
        return out


async def create_completion(state: ServerState, req: CompletionRequest, http: HTTPRequest) -> Response:
    model = state.resolve_model(req.model)
    check_n(state, req.n)
    prompts = await run_in_threadpool(encode_prompts, state.tokenizer, req.prompt)
    for ids, _ in prompts:
        check_context(state, len(ids), req.max_tokens, "prompt")
    k = req.logprobs
    score_only = req.max_tokens == 0
    job = Job([ids for ids, _ in prompts], sampling_params(state, req, req.max_tokens, k or 0), stop=req.stop,
              skip_special_tokens=req.skip_special_tokens,
              prompt_logprobs=k if (req.echo and k is not None) else None, score_only=score_only)
    submit(state, job)
    reply = _Reply(state, req, model, prompts)
    if req.stream:
        return SSEResponse(reply.stream(job), on_close=lambda: state.worker.cancel(job))
    body = await reply.collect(job, http)
    return JSONResponse(body) if body is not None else Response(status_code=499)


class _Reply:
    def __init__(self, state: ServerState, req: CompletionRequest, model: str, prompts: list[tuple[list[int], str]]):
        self.state, self.req, self.model, self.prompts = state, req, model, prompts
        self.n = req.n
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        choices = len(prompts) * self.n
        tok = state.tokenizer
        base = [len(prompts[c // self.n][1]) if req.echo else 0 for c in range(choices)]
        self.logprobs = None
        if req.logprobs is not None:
            self.logprobs = [_Logprobs(state.texts, req.logprobs, tok.stream_decoder(req.skip_special_tokens), base[c])
                             for c in range(choices)]
        self.counts = [0] * choices

    def _usage(self) -> Usage:
        prompt_tokens = sum(len(ids) for ids, _ in self.prompts)
        done = sum(self.counts)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)

    def _echo(self, scores: PromptScores) -> list[int]:
        """Record the prompt's logprobs in front of each of its choices; returns the choices."""
        ids = self.prompts[scores.prompt][0]
        choices = list(range(scores.prompt * self.n, (scores.prompt + 1) * self.n))
        for c in choices:
            lp = self.logprobs[c]
            decoder = self.state.tokenizer.stream_decoder(False)  # the prompt text keeps its control tokens
            offset = 0
            for t, token_id in enumerate(ids):
                lp.tokens.append(self.state.texts.text(token_id))
                lp.text_offset.append(offset)
                offset += len(decoder.push(token_id))
                if t == 0 or scores.score is None:
                    lp.token_logprobs.append(None)
                    lp.top.append(None)
                    continue
                s = scores.score
                lp.token_logprobs.append(_finite(s.logprobs[t - 1]))
                alts: dict[str, float] = {}
                for i, v in (s.top_logprobs[t - 1] if s.top_logprobs else [])[:lp.k]:
                    alts.setdefault(self.state.texts.text(i), _finite(v))
                lp.top.append(alts)
        return choices

    def _add_tokens(self, c: int, tokens: list[TokenInfo]) -> None:
        if self.logprobs is not None:
            for t in tokens:
                self.logprobs[c].add(t.id, t.logprob, t.top)

    async def collect(self, job: Job, http: HTTPRequest) -> dict | None:
        choices = len(self.prompts) * self.n
        texts = [self.prompts[c // self.n][1] if self.req.echo else "" for c in range(choices)]
        reasons: list[str | None] = [None] * choices
        async for u in job_updates(self.state, job, http):
            if isinstance(u, PromptScores):
                self._echo(u)
                continue
            texts[u.choice] += u.text
            self._add_tokens(u.choice, u.tokens)
            self.counts[u.choice] = u.completion_tokens
            reasons[u.choice] = u.finish_reason or reasons[u.choice]
        if any(r is None for r in reasons):
            return None
        out = [CompletionChoice(index=c, text=texts[c], finish_reason=reasons[c],
                                logprobs=self.logprobs[c].take() if self.logprobs else None)
               for c in range(choices)]
        return Completion(id=self.id, created=self.created, model=self.model, system_fingerprint=self.state.fingerprint,
                          choices=out, usage=self._usage()).dump()

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return event(Completion(id=self.id, created=self.created, model=self.model,
                                system_fingerprint=self.state.fingerprint, choices=choices, usage=usage).dump())

    async def stream(self, job: Job):
        options = self.req.stream_options
        continuous = options is not None and options.continuous_usage_stats
        echoed = set()

        def usage() -> Usage | None:
            return self._usage() if continuous else None

        async for u in job_updates(self.state, job):
            if isinstance(u, PromptScores):
                for c in self._echo(u):
                    echoed.add(c)
                    yield self._chunk([CompletionChoice(index=c, text=self.prompts[u.prompt][1], finish_reason=None,
                                                        logprobs=self.logprobs[c].take())], usage())
                continue
            c = u.choice
            text = u.text
            if self.req.echo and c not in echoed:  # echo without logprobs: the prompt leads the first chunk
                echoed.add(c)
                text = self.prompts[c // self.n][1] + text
            self._add_tokens(c, u.tokens)
            self.counts[c] = u.completion_tokens
            if text or u.finish_reason is not None or (self.logprobs and u.tokens):
                yield self._chunk([CompletionChoice(index=c, text=text, finish_reason=u.finish_reason,
                                                    logprobs=self.logprobs[c].take() if self.logprobs else None)],
                                  usage())
        if options is not None and options.include_usage:
            yield self._chunk([], self._usage())
