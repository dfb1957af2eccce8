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

import functools
import json
import math
import re
import sys
from collections.abc import Mapping
from contextlib import contextmanager
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
        except RecursionError:
            raise _too_deep(f"{where}.function.arguments") from None
    _check_depth(arguments, f"{where}.function.arguments")
    return {"name": fn["name"], "arguments": arguments}


MAX_JSON_DEPTH = 64  # nesting of tool schemas and arguments; rendering and encoding recurse on it


def _too_deep(where: str) -> ChatError:
    return ChatError(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep; flatten it")


def _check_depth(value: Any, where: str) -> None:
    """Iterative (no recursion of its own): lists and objects nest at most MAX_JSON_DEPTH."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, Mapping):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(where)
        stack.extend((c, depth + 1) for c in children)


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
    for i, t in enumerate(tools):
        _check_depth(t, f"tools[{i}]")
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
# A chat template shipped with a checkpoint is untrusted code. The immutable sandbox stops it
# from reaching Python internals; these budgets stop it from hanging or exhausting the
# process. They are far above what a chat template needs (the official one renders 400
# messages in about 40K steps and a few KB) and are counted, not timed, so an outcome never
# depends on the machine's load.
MAX_TEMPLATE_STEPS = 5_000_000  # executed lines of template code (loop turns count each)
MAX_TEMPLATE_CHARS = 16 * 2**20  # characters rendered, and the largest string/list built
MAX_TEMPLATE_INT = 1 << 20  # largest integer a template may pass to a function or filter
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width/precision that would build a huge string
_TEMPLATE_FILE = "<template>"  # the file name Jinja compiles templates under


def _raise_exception(message: str) -> None:
    raise ChatError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _too_big(what: str) -> ChatError:
    return ChatError(f"chat template: {what} exceeds the rendering budget (at most "
                     f"{MAX_TEMPLATE_CHARS:,} characters and integers up to {MAX_TEMPLATE_INT:,}); "
                     "fix the template")


def _check_arguments(args: tuple, kwargs: dict, formatting: bool = False) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEMPLATE_INT:
            raise _too_big(f"the integer argument {v}")
        if formatting and isinstance(v, str) and _WIDE_FORMAT.search(v):
            raise _too_big("a format width")


def _check_result(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEMPLATE_CHARS:
        raise _too_big(f"a value of {len(value):,} items")
    return value


def _guard_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_ctx marks
    def guarded(*args, **kwargs):
        _check_arguments(args, kwargs, formatting=f.__name__ in ("do_format", "format"))
        return _check_result(f(*args, **kwargs))
    return guarded


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox with size checks on every call and on the operators that grow data."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            formatting = getattr(__obj, "__name__", "") in ("format", "format_map")
            _check_arguments(args, kwargs, formatting)
            if formatting and isinstance(getattr(__obj, "__self__", None), str):
                _check_arguments((__obj.__self__,), {}, True)
            try:
                return _check_result(super().call(__context, __obj, *args, **kwargs))
            except OverflowError as e:  # the sandbox's own range limit
                raise _too_big(str(e)) from None

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_CHARS:
                        raise _too_big(f"a repetition of {len(seq):,} x {n:,} items")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                        right * math.log2(abs(left)) > 64 * 1024:
                    raise _too_big(f"the power {left} ** {right}")
            elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise _too_big("a format width")
            return _check_result(super().call_binop(context, operator, left, right))

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters = {name: _guard_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError

    try:
        return _environment().from_string(template)
    except TemplateError as e:
        raise ChatError(f"chat template does not compile: {e}") from None
    except RecursionError:
        raise ChatError("chat template does not compile: nested too deeply") from None


@contextmanager
def _step_budget(limit: int):
    """Count executed lines in template frames (Jinja compiles templates to Python) and stop
    the render past `limit`. Only template frames get a line tracer; any tracer installed
    before (a debugger, coverage) is put back afterwards."""
    steps = 0

    def line_tracer(frame, event, arg):
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > limit:
                raise ChatError(f"chat template: rendering took more than {limit:,} steps (an "
                                "endless or enormous loop?); fix the template")
        return line_tracer

    def call_tracer(frame, event, arg):
        return line_tracer if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(call_tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def render_jinja(template: str, messages: list[dict], tools: list | None = None,
                 add_generation_prompt: bool = False, **variables: Any) -> str:
    """Render a Jinja chat template in the sandbox, as transformers does. `variables` (e.g.
    eos_token, bos_token) are passed to the template too. A template that runs past the
    budgets above (steps, characters, integer sizes) or recurses without end raises
    `ChatError`."""
    from jinja2 import TemplateError

    messages, tools = prepare_messages(messages), prepare_tools(tools)
    compiled = _compile(template)
    try:
        out, size = [], 0
        with _step_budget(MAX_TEMPLATE_STEPS):
            for piece in compiled.generate(messages=messages, tools=tools,
                                           add_generation_prompt=add_generation_prompt, **variables):
                size += len(piece)
                if size > MAX_TEMPLATE_CHARS:
                    raise _too_big(f"the rendered text ({size:,} characters so far)")
                out.append(piece)
        return "".join(out)
    except UserError:
        raise
    except TemplateError as e:  # includes SecurityError from the sandbox
        raise ChatError(f"chat template failed: {e}") from None
    except RecursionError:
        raise ChatError("chat template: recursion too deep (a macro that calls itself without "
                        "end?); fix the template") from None
    except (MemoryError, OverflowError):
        raise _too_big("a value") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise ChatError(f"chat template failed on these messages: {e}") from None
