"""The assistant's turn: messages -> chat template -> engine -> a message with tool calls.

The engine knows token ids (and, through its dispatcher, text and stop strings); this layer
adds the conversation: the prompt is the tokenizer's chat template over the messages and
tools (`tokenizer.apply_chat_template`, the one place that knows the template), and the
reply's hermes-style `<tool_call>` blocks are parsed with `qwen25.chat.parse_tool_calls`.
The terminal chat (`qwen25 chat`), `qwen25 generate --chat` and evaluation use it; the HTTP
server renders OpenAI-shaped messages itself (`qwen25.serve.chat`) on the same template.

- `chat_prompt(tokenizer, messages, tools)`: the ids of a conversation + generation prompt;
- `chat(engine, tokenizer, messages, tools=None, ...)`: the assistant message (content and
  parsed tool calls), finish reason and token usage;
- `stream_chat(...)`: the reply's text as it is produced, then its `ChatResult`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from qwen25.chat import parse_tool_calls
from qwen25.engine.dispatch import Dispatcher
from qwen25.engine.engine import make_params
from qwen25.engine.scheduler import Request


@dataclass
class ChatResult:
    message: dict  # {"role": "assistant", "content": str | None, "tool_calls": [...]}
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens
    text: str = ""  # the raw generated text (tool-call blocks included)


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The token ids of a conversation followed by the assistant's generation prompt."""
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)


def chat(engine, tokenizer, messages: list[dict], tools: list[dict] | None = None,
         max_new_tokens: int = 512, stop: Sequence[str] = (), **sampling) -> ChatResult:
    """Answer a conversation: the assistant message with its tool calls parsed.

    content is None when the reply holds only tool calls; each call is OpenAI-shaped minus
    the id: {"type": "function", "function": {"name": str, "arguments": dict}}. finish_reason
    is "tool_calls" when there are calls, else "stop" or "length". `sampling`: the keywords
    of `Engine.generate`.
    """
    result = None
    for result in stream_chat(engine, tokenizer, messages, tools, max_new_tokens, stop, **sampling):
        pass
    return result


def stream_chat(engine, tokenizer, messages: list[dict], tools: list[dict] | None = None,
                max_new_tokens: int = 512, stop: Sequence[str] = (), **sampling) -> Iterator[str | ChatResult]:
    """Yield text deltas of the assistant's reply, then (last) its ChatResult. Closing the
    iterator cancels the request."""
    prompt = chat_prompt(tokenizer, messages, tools)
    dispatcher = Dispatcher(engine, tokenizer)
    sub = dispatcher.submit(prompt, make_params(max_new_tokens=max_new_tokens, **sampling), stop)
    for ev in dispatcher.run([sub]):
        if ev.text:
            yield ev.text
    yield chat_result(sub.request, sub.text(0), sub.finish_reason(0) or "stop", tools is not None)


def chat_result(request: Request, text: str, finish_reason: str, parse_tools: bool) -> ChatResult:
    """The ChatResult of sample 0 of a finished engine request whose reply text is `text`."""
    tokens = request.outputs[0].tokens
    content, calls = parse_tool_calls(text) if parse_tools else (text, [])
    message: dict = {"role": "assistant", "content": content}
    reason = finish_reason
    if calls:
        message["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        reason = "tool_calls"
    usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(tokens),
             "total_tokens": len(request.prompt) + len(tokens)}
    return ChatResult(message, reason, usage, text)
