"""POST /v1/chat/completions: messages -> prompt -> job -> message (or a stream of deltas).

The prompt is the chat template of the checkpoint's tokenizer (the official Qwen2.5 one
when the folder has none) over the messages and tools, with OpenAI-style assistant tool
calls (arguments as a JSON string) turned back into the objects the model was trained on
(`qwen25.chat.prepare_messages`). The "developer" role is rendered as "system".

Streaming (reliability.md §1.3): the first chunk of each choice carries `role`; content
and tool calls follow as deltas; each choice ends with exactly one chunk whose
finish_reason is set; `stream_options.include_usage` adds a last chunk with `choices: []`.
Concatenated content deltas equal the non-streamed content (the same text and the same
parser feed both).
"""

from __future__ import annotations

import math
import secrets
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from qwen25.chat import ChatError
from qwen25.serve.errors import invalid
from qwen25.serve.openai_tools import ToolCallStream, forced_prefix, parse_reply
from qwen25.serve.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                  ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChatMessage,
                                  ChoiceLogprobs, FunctionDelta, TokenLogprob, ToolCallDeltaOut, ToolCallOut,
                                  TopLogprob, Usage)
from qwen25.serve.state import ServerState, TokenTexts, check_context, check_n, job_updates, sampling_params, submit
from qwen25.serve.streaming import SSEResponse, event
from qwen25.serve.worker import Job, TokenInfo

MIN_LOGPROB = -9999.0  # JSON has no -Infinity; what vLLM sends for a token of probability 0


def template_message(m: ChatMessage) -> dict:
    """A validated OpenAI message as the chat template reads it."""
    out: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                "arguments": c.function.arguments}}
                             for c in m.tool_calls]
    for key in ("name", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def build_prompt(tokenizer, messages: list[dict], tools: list[dict] | None, prefix: str) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    except ChatError as e:
        raise invalid(str(e), param="messages") from None
    return list(ids) + (tokenizer.encode(prefix, allow_special=True) if prefix else [])


def logprob_entry(texts: TokenTexts, token: TokenInfo, k: int) -> TokenLogprob:
    top = [TopLogprob(token=texts.text(i), logprob=_finite(lp), bytes=texts.bytes(i)) for i, lp in (token.top or [])[:k]]
    return TokenLogprob(token=texts.text(token.id), logprob=_finite(token.logprob), bytes=texts.bytes(token.id),
                        top_logprobs=top)


def _finite(lp: float) -> float:
    return lp if math.isfinite(lp) else MIN_LOGPROB


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: dict,
                                 http: HTTPRequest) -> Response:
    model = state.resolve_model(req.model)
    check_n(state, req.n)
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise invalid("response_format other than {'type': 'text'} (JSON mode, JSON schema) is not supported",
                      param="response_format")
    use_tools = bool(req.tools) and req.tool_choice != "none"
    prefix = forced_prefix(req.tool_choice) if use_tools else ""
    parallel = req.parallel_tool_calls is not False
    messages = [template_message(m) for m in req.messages]
    prompt = await run_in_threadpool(build_prompt, state.tokenizer, messages, raw.get("tools") or None, prefix)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = check_context(state, len(prompt), req.max_new_tokens, "messages", param)
    k = (req.top_logprobs or 0) if req.logprobs else 0
    job = Job([prompt], sampling_params(state, req, max_new, k), stop=req.stop,
              skip_special_tokens=req.skip_special_tokens)
    submit(state, job)
    reply = _Reply(state, req, model, len(prompt), use_tools, prefix, parallel, k)
    if req.stream:
        return SSEResponse(reply.stream(job), on_close=lambda: state.worker.cancel(job))
    body = await reply.collect(job, http)
    return JSONResponse(body) if body is not None else Response(status_code=499)


class _Reply:
    """Turns a job's updates into a chat.completion or a stream of chunks."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, model: str, prompt_tokens: int,
                 use_tools: bool, prefix: str, parallel: bool, k: int):
        self.state, self.req, self.model = state, req, model
        self.prompt_tokens, self.use_tools, self.prefix, self.parallel, self.k = (
            prompt_tokens, use_tools, prefix, parallel, k)
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    def _logprobs(self, tokens: list[TokenInfo]) -> ChoiceLogprobs | None:
        if not self.req.logprobs:
            return None
        return ChoiceLogprobs(content=[logprob_entry(self.state.texts, t, self.k) for t in tokens])

    def _usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)

    async def collect(self, job: Job, http: HTTPRequest) -> dict | None:
        n = self.req.n
        texts, tokens = [""] * n, [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        counts = [0] * n
        async for u in job_updates(self.state, job, http):
            texts[u.choice] += u.text
            tokens[u.choice] += u.tokens
            counts[u.choice] = u.completion_tokens
            reasons[u.choice] = u.finish_reason or reasons[u.choice]
        if any(r is None for r in reasons):
            return None  # the client hung up; nobody reads this
        choices = []
        for c in range(n):
            content, calls = (parse_reply(texts[c], self.prefix, self.parallel) if self.use_tools
                              else (texts[c], []))
            message = AssistantMessage(content=content, tool_calls=calls or None)
            choices.append(ChatChoice(index=c, message=message, logprobs=self._logprobs(tokens[c]),
                                      finish_reason="tool_calls" if calls else reasons[c]))
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              system_fingerprint=self.state.fingerprint, choices=choices,
                              usage=self._usage(sum(counts))).dump()

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return event(ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                         system_fingerprint=self.state.fingerprint, choices=choices,
                                         usage=usage).dump())

    async def stream(self, job: Job):
        n = self.req.n
        options = self.req.stream_options
        continuous = options is not None and options.continuous_usage_stats
        counts = [0] * n
        parsers = [ToolCallStream(self.prefix, self.parallel) for _ in range(n)] if self.use_tools else None
        sent_calls = [0] * n

        def running_usage() -> Usage | None:
            return self._usage(sum(counts)) if continuous else None

        for c in range(n):
            yield self._chunk([ChatChunkChoice(index=c, delta=ChatDelta(role="assistant", content=""))],
                              running_usage())
        async for u in job_updates(self.state, job):
            c = u.choice
            counts[c] = u.completion_tokens
            if parsers is None:
                pieces: list[str | ToolCallOut] = [u.text] if u.text else []
            else:
                pieces = parsers[c].feed(u.text)
                if u.finish_reason is not None:
                    pieces += parsers[c].finish()
            content = "".join(p for p in pieces if isinstance(p, str))
            logprobs = self._logprobs(u.tokens) if u.tokens else None
            if content or logprobs is not None:
                yield self._chunk([ChatChunkChoice(index=c, delta=ChatDelta(content=content), logprobs=logprobs)],
                                  running_usage())
            for call in (p for p in pieces if isinstance(p, ToolCallOut)):
                delta = ToolCallDeltaOut(index=sent_calls[c], id=call.id, type="function",
                                         function=FunctionDelta(name=call.function.name,
                                                                arguments=call.function.arguments))
                sent_calls[c] += 1
                yield self._chunk([ChatChunkChoice(index=c, delta=ChatDelta(tool_calls=[delta]))], running_usage())
            if u.finish_reason is not None:
                reason = "tool_calls" if sent_calls[c] else u.finish_reason
                yield self._chunk([ChatChunkChoice(index=c, delta=ChatDelta(), finish_reason=reason)],
                                  running_usage())
        if options is not None and options.include_usage:
            yield self._chunk([], self._usage(sum(counts)))
