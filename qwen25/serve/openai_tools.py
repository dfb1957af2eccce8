"""OpenAI tool calls <-> Qwen2.5's hermes-style `<tool_call>` blocks.

The model writes `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (parsed by
`qwen25.chat.tools`); OpenAI clients expect `message.tool_calls` with `arguments` as a JSON
string, an `id` per call, and `finish_reason: "tool_calls"`.

Streaming sends each call as one delta (id, type, name and the complete arguments) the
moment its block closes and parses. Sending argument fragments earlier would be faster to
show, but a block can still turn out malformed (or be cut by max_tokens), and a streamed
tool call cannot be taken back; vLLM's hermes parser streams fragments and its issue
tracker shows the resulting broken arguments. Here the streamed calls and content always
equal the non-streamed ones, for any split of the text into deltas.

`tool_choice` without constrained decoding: "required" starts the reply with `<tool_call>\\n`
and a named function with `<tool_call>\\n{"name": "NAME", "arguments": `, appended to the
prompt (`forced_prefix`), so the model can only continue a call. The prefix is parsed as
part of the reply. "none" renders the tools but parses no calls.
"""

from __future__ import annotations

import json
import secrets

from qwen25.chat.tools import ContentDelta, ToolCallDone, ToolCallStreamParser, parse_tool_calls
from qwen25.serve.schemas import FunctionCallOut, ToolCallOut


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def forced_prefix(tool_choice) -> str:
    """Text the reply must start with for `tool_choice` (see module docstring)."""
    if tool_choice == "required":
        return "<tool_call>\n"
    if isinstance(tool_choice, dict):
        return '<tool_call>\n{"name": ' + json.dumps(tool_choice["function"]["name"]) + ', "arguments": '
    return ""


def to_openai(call: dict, call_id: str | None = None) -> ToolCallOut:
    """{"name", "arguments": dict} -> an OpenAI tool call (arguments as JSON text)."""
    return ToolCallOut(id=call_id or new_call_id(),
                       function=FunctionCallOut(name=call["name"],
                                                arguments=json.dumps(call["arguments"], ensure_ascii=False)))


def parse_reply(text: str, prefix: str = "", parallel: bool = True) -> tuple[str | None, list[ToolCallOut]]:
    """A finished reply -> (content, tool calls). Without valid calls the content is the
    whole text (prefix included); `parallel=False` keeps only the first call."""
    content, calls = parse_tool_calls(prefix + text)
    if not parallel:
        calls = calls[:1]
    return content, [to_openai(c) for c in calls]


class ToolCallStream:
    """Incremental `parse_reply` for one choice: text deltas in, content text and finished
    tool calls out."""

    def __init__(self, prefix: str = "", parallel: bool = True):
        self._parser = ToolCallStreamParser()
        self._parallel = parallel
        self.calls = 0  # tool calls sent so far
        self._pending = self._parser.feed(prefix) if prefix else []

    def feed(self, text: str) -> list[str | ToolCallOut]:
        events = self._pending + (self._parser.feed(text) if text else [])
        self._pending = []
        return self._convert(events)

    def finish(self) -> list[str | ToolCallOut]:
        events = self._pending + self._parser.finish()
        self._pending = []
        return self._convert(events)

    def _convert(self, events) -> list[str | ToolCallOut]:
        out: list[str | ToolCallOut] = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                out.append(ev.text)
            elif isinstance(ev, ToolCallDone) and (self._parallel or self.calls == 0):
                out.append(to_openai({"name": ev.name, "arguments": ev.arguments}))
                self.calls += 1
        return out
