"""Rendering conversations to text: the Qwen2.5-Instruct template, and any Jinja template.

`render` is a Python transcription of the official Qwen2.5-Instruct `chat_template`
(qwen25-spec.md §2.4; the Jinja source ships as qwen25/assets/qwen2.5-instruct.jinja).
Tests check it byte for byte against that Jinja source rendered the way transformers does.
In short:

    <|im_start|>system\\n{system or default}[tools preamble]<|im_end|>\\n
    <|im_start|>{role}\\n{content}<|im_end|>\\n                         user / assistant / later system
    <|im_start|>assistant[\\n{content}]{\\n<tool_call>\\n{json}\\n</tool_call>}*<|im_end|>\\n
    <|im_start|>user{\\n<tool_response>\\n{content}\\n</tool_response>}*<|im_end|>\\n   consecutive tool messages
    <|im_start|>assistant\\n                                            add_generation_prompt

`render_jinja` renders any other template (a checkpoint's own) in Jinja's immutable sandbox
with transformers' settings: trim_blocks, lstrip_blocks, loopcontrols, and a `tojson` that
keeps key order and non-ASCII characters.

Both take messages already passed through `prepare_messages`, which validates them and
turns OpenAI-style tool calls (`{"type": "function", "function": {"name", "arguments":
"<json string>"}}`) into the `{"name", "arguments": {...}}` objects the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from qwen25.errors import UserError

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEADER = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
                "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
                "<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name "
                "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")
ROLES = ("system", "user", "assistant", "tool")


class ChatError(UserError):
    """A conversation that cannot be rendered (bad role, missing content, ...)."""


def tojson(value: Any) -> str:
    """transformers' `tojson` filter: insertion key order, raw Unicode, ", " / ": "."""
    return json.dumps(value, ensure_ascii=False)


# ---- validation ----------------------------------------------------------------------
def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text can be rendered
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ChatError(f"{where}: only text content parts can be rendered, got {part!r:.80}")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError(f"{where}: content must be a string, not {type(content).__name__}")


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, Mapping):
        raise ChatError(f"{where}: a tool call must be an object, not {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ChatError(f"{where}: a tool call needs a function name")
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI sends arguments as a JSON string; the model saw an object. A string that is
        # not JSON is rendered as a JSON string, as the official template would.
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"name": fn["name"], "arguments": arguments}


def prepare_messages(messages: Any) -> list[dict]:
    """Validated copies of `messages`: role in ROLES, text content, normalised tool calls."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        calls = m.get("tool_calls") or []
        if calls and role != "assistant":
            raise ChatError(f"{where}: only assistant messages can carry tool_calls")
        if not isinstance(calls, (list, tuple)):
            raise ChatError(f"{where}: tool_calls must be a list")
        content = m.get("content")
        if content is None and (calls or role == "assistant"):
            content = ""  # an assistant turn that only calls tools
        msg = {**m, "role": role, "content": _text_content(content, where)}
        if calls:
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(msg)
    return out


def prepare_tools(tools: Any) -> list | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise ChatError("tools must be a list of JSON schema objects")
    return list(tools) or None


# ---- the Qwen2.5-Instruct template ---------------------------------------------------
def render(messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The official Qwen2.5-Instruct rendering of `messages` (see module docstring)."""
    messages, tools = prepare_messages(messages), prepare_tools(tools)
    out: list[str] = []
    first_is_system = messages[0]["role"] == "system"
    system = messages[0]["content"] if first_is_system else DEFAULT_SYSTEM
    out.append("<|im_start|>system\n" + system)
    if tools:
        out.append(TOOLS_HEADER)
        out.extend("\n" + tojson(tool) for tool in tools)
        out.append(TOOLS_FOOTER)
    out.append("<|im_end|>\n")
    last = len(messages) - 1
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system" and i == 0:
            continue  # already in the system block
        if role in ("user", "system") or (role == "assistant" and not m.get("tool_calls")):
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            out.append("<|im_start|>assistant")
            if content:
                out.append("\n" + content)
            for call in m["tool_calls"]:
                out.append('\n<tool_call>\n{"name": "' + call["name"] + '", "arguments": '
                           + tojson(call["arguments"]) + "}\n</tool_call>")
            out.append("<|im_end|>\n")
        else:  # tool: consecutive results share one user turn
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + content + "\n</tool_response>")
            if i == last or messages[i + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# ---- any Jinja template --------------------------------------------------------------
def _raise_exception(message: str) -> None:
    raise ChatError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatError(f"chat template does not compile: {e}") from None


def render_jinja(template: str, messages: list[dict], tools: list | None = None,
                 add_generation_prompt: bool = False, **variables: Any) -> str:
    """Render a Jinja chat template in the sandbox, as transformers does. `variables` (e.g.
    eos_token, bos_token) are passed to the template too."""
    from jinja2 import TemplateError

    messages, tools = prepare_messages(messages), prepare_tools(tools)
    try:
        return _compile(template).render(messages=messages, tools=tools,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:  # includes SecurityError from the sandbox
        raise ChatError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        if isinstance(e, UserError):
            raise
        raise ChatError(f"chat template failed on these messages: {e}") from None
