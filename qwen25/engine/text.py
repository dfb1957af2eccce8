"""Text on top of the token engine: detokenisation, stop strings, chat, tool calls.

The Engine knows token ids; this layer adds what a person or an API client sees:

- `TextStream`: one sample's token ids -> text deltas. Detokenisation is incremental and
  never splits a UTF-8 character; stop strings end the text *before* the match (as the
  OpenAI API and vLLM do), and text that could still become a stop string is held back.
- `complete(engine, tokenizer, prompts, ...)` / `stream_complete(...)`: text in, text out.
- `chat(engine, tokenizer, messages, tools=None, ...)`: messages -> the assistant message
  (content and parsed hermes-style tool calls), finish reason and token usage. The server
  and evaluation reuse it; `stream_chat` yields the text as it is produced.
- `sampling_defaults(model)`: the model's recommended sampling (generation_config.json).

A stop string found in the text cancels the request in the engine, so no compute is spent
past it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from qwen25.chat import parse_tool_calls
from qwen25.engine.engine import Engine
from qwen25.engine.scheduler import Request
from qwen25.errors import UserError


class TextStream:
    """Token ids of one sample -> safe-to-show text deltas, honouring stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise UserError("stop strings must be non-empty strings")
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
        self._stop = list(stop)
        self._pending = ""  # decoded but not yet shown: might be the start of a stop string
        self.text = ""  # everything shown so far
        self.stopped = False  # a stop string was found (the text ends before it)

    def push(self, token_id: int) -> str:
        """Feed one generated id; returns the text that can be shown now (may be "")."""
        if self.stopped:
            return ""
        self._pending += self._decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: the held-back text (unless a stop string cut it)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final:
            out, self._pending = self._pending, ""
        else:
            keep = _longest_stop_prefix(self._pending, self._stop)
            out = self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep:]
        self.text += out
        return out


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass
class TextCompletion:
    text: str
    finish_reason: str  # "stop" (stop token or stop string) | "length" | "cancelled"
    token_ids: list[int]  # generated ids (up to and including what produced the stop)
    prompt_tokens: int


@dataclass
class ChatResult:
    message: dict  # {"role": "assistant", "content": str | None, "tool_calls": [...]}
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens
    text: str = ""  # the raw generated text (tool-call blocks included)


def sampling_defaults(model) -> dict:
    """The sampling a checkpoint recommends (its generation_config.json) as Engine keywords.

    Only the keys present are returned: temperature (0 when do_sample is false), top_p,
    top_k, min_p, repetition_penalty, and max_new_tokens when the config sets it.
    """
    gen = getattr(model, "generation_config", None) or {}
    out: dict = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"):
        if isinstance(gen.get(key), (int, float)) and not isinstance(gen.get(key), bool):
            out[key] = gen[key]
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


# ---- completions ---------------------------------------------------------------------


def _run(engine: Engine, requests: list[Request], streams: list[list[TextStream]]) -> Iterator[tuple[int, int, str]]:
    """Step the engine until `requests` finish; yield (request index, sample, text delta).

    A sample whose text hits a stop string is finished: the request is cancelled once all
    its samples are done, freeing its slots.
    """
    done = [[False] * r.params.n for r in requests]
    index = {id(r): i for i, r in enumerate(requests)}
    try:
        while not all(all(d) for d in done):
            for ev in engine.step():
                i = index.get(id(ev.request))
                if i is None or done[i][ev.index]:
                    continue
                ts = streams[i][ev.index]
                delta = ts.push(ev.token)
                if ts.stopped or ev.finished:
                    delta += ts.finish()
                    done[i][ev.index] = True
                    if all(done[i]) and not ev.request.finished:
                        engine.cancel(ev.request)
                if delta:
                    yield i, ev.index, delta
            for i, r in enumerate(requests):  # cancelled from elsewhere
                if r.finished and not all(done[i]):
                    done[i] = [True] * r.params.n
    finally:
        for r in requests:
            if not r.finished:
                engine.cancel(r)


def _finish_reason(request: Request, index: int, stream: TextStream) -> str:
    return "stop" if stream.stopped else (request.outputs[index].finish_reason or "stop")


def complete(engine: Engine, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16,
             stop: Sequence[str] = (), skip_special_tokens: bool = True, **sampling) -> list[TextCompletion]:
    """Complete each text prompt (plain text, no template); len(prompts) * n results,
    prompt-major, like `Engine.generate`. `sampling`: Engine.generate's keywords."""
    if isinstance(prompts, str):
        raise UserError("complete takes a list of prompts; wrap a single prompt in a list")
    requests = [engine.add(tokenizer.encode(p), max_new_tokens=max_new_tokens, **sampling) for p in prompts]
    streams = [[TextStream(tokenizer, stop, skip_special_tokens) for _ in range(r.params.n)] for r in requests]
    for _ in _run(engine, requests, streams):
        pass
    return [TextCompletion(streams[i][j].text, _finish_reason(r, j, streams[i][j]),
                           list(r.outputs[j].tokens), len(r.prompt))
            for i, r in enumerate(requests) for j in range(r.params.n)]


def stream_complete(engine: Engine, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 16,
                    stop: Sequence[str] = (), skip_special_tokens: bool = True,
                    **sampling) -> Iterator[str | TextCompletion]:
    """Yield the text of one prompt (token ids) as it is generated, then (last) its
    TextCompletion. Closing the iterator cancels the request. Stop strings are never shown."""
    if sampling.get("n", 1) != 1:
        raise UserError("streaming produces one sample; use n=1")
    request = engine.add(prompt_ids, max_new_tokens=max_new_tokens, **sampling)
    stream = TextStream(tokenizer, stop, skip_special_tokens)
    for _, _, delta in _run(engine, [request], [[stream]]):
        yield delta
    yield TextCompletion(stream.text, _finish_reason(request, 0, stream), list(request.outputs[0].tokens),
                         len(request.prompt))


# ---- chat ------------------------------------------------------------------------------


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The token ids of a conversation followed by the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)


def chat(engine: Engine, tokenizer, messages: list[dict], tools: list[dict] | None = None,
         max_new_tokens: int = 512, stop: Sequence[str] = (), **sampling) -> ChatResult:
    """Answer a conversation: the assistant message with its tool calls parsed.

    content is None when the reply holds only tool calls; each call is OpenAI-shaped minus
    the id: {"type": "function", "function": {"name": str, "arguments": dict}}. finish_reason
    is "tool_calls" when there are calls, else "stop" or "length".
    """
    prompt = chat_prompt(tokenizer, messages, tools)
    stream = TextStream(tokenizer, stop)
    request = engine.add(prompt, max_new_tokens=max_new_tokens, **sampling)
    for _ in _run(engine, [request], [[stream]]):
        pass
    return _chat_result(request, stream, tools is not None)


def stream_chat(engine: Engine, tokenizer, messages: list[dict], tools: list[dict] | None = None,
                max_new_tokens: int = 512, stop: Sequence[str] = (), **sampling) -> Iterator[str | ChatResult]:
    """Yield text deltas of the assistant's reply, then (last) its ChatResult."""
    prompt = chat_prompt(tokenizer, messages, tools)
    stream = TextStream(tokenizer, stop)
    request = engine.add(prompt, max_new_tokens=max_new_tokens, **sampling)
    for _, _, delta in _run(engine, [request], [[stream]]):
        yield delta
    yield _chat_result(request, stream, tools is not None)


def _chat_result(request: Request, stream: TextStream, parse_tools: bool) -> ChatResult:
    out = request.outputs[0]
    text = stream.text
    content, calls = parse_tool_calls(text) if parse_tools else (text, [])
    message: dict = {"role": "assistant", "content": content}
    reason = _finish_reason(request, 0, stream)
    if calls:
        message["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        reason = "tool_calls"
    usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(out.tokens),
             "total_tokens": len(request.prompt) + len(out.tokens)}
    return ChatResult(message, reason, usage, text)
