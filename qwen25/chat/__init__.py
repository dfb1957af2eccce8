"""Chat: the Qwen2.5-Instruct template, conversations -> ids + assistant mask, tool calls.

The one place that knows the template (layer 2, above `qwen25.tokenizer`):

* `render(messages, tools=None, add_generation_prompt=False) -> str` - official rendering.
* `render_jinja(template, messages, ...)` - any checkpoint template, in Jinja's sandbox.
* `encode_chat(tokenizer, messages, tools=None, add_generation_prompt=False)
  -> (ids, assistant_mask)` - injection-safe ids; mask semantics in `qwen25.chat.encode`.
* `apply_chat_template(tokenizer, ...)` - what `Tokenizer.apply_chat_template` calls.
* `parse_tool_calls(text) -> (content, calls)` and `ToolCallStreamParser` - model output;
  event types in `qwen25.chat.tools`.
"""

from qwen25.chat.encode import apply_chat_template, encode_chat, render_text, uses_builtin_template
from qwen25.chat.template import (DEFAULT_SYSTEM, ChatError, prepare_messages, render,
                                  render_jinja, tojson)
from qwen25.chat.tools import (ContentDelta, Event, ToolCallDelta, ToolCallDone, ToolCallFailed,
                               ToolCallStreamParser, parse_call, parse_tool_calls)

__all__ = [
    "DEFAULT_SYSTEM", "ChatError", "ContentDelta", "Event", "ToolCallDelta", "ToolCallDone",
    "ToolCallFailed", "ToolCallStreamParser", "apply_chat_template", "encode_chat", "parse_call",
    "parse_tool_calls", "prepare_messages", "render", "render_jinja", "render_text", "tojson",
    "uses_builtin_template",
]
