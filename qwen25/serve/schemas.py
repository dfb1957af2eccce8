"""Pydantic models of every request and response body (the OpenAI API, plus vLLM's extensions).

Requests are validated strictly (`strict=True`): a string where a number belongs, 1 for a
boolean, NaN or infinity are 400s rather than guesses. Unknown fields are ignored, because
the `openai` client sends `extra_body` keys at the top level. Fields left out are None, so
the server can tell "not given" (use the model's generation_config.json) from a value.

Extensions beyond OpenAI, named as vLLM names them: `top_k` (-1 or 0: off), `min_p`,
`repetition_penalty` (HF semantics), `ignore_eos`, `skip_special_tokens`; and
`stream_options.continuous_usage_stats`.

Responses are built from these models and dumped with `dump()`: fields that OpenAI leaves
out when empty (a delta's role, a message's tool_calls) are dropped, while `finish_reason`,
`logprobs` and `content` stay, as null where they have no value.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM any number)
MAX_N = 128
MAX_TOP_LOGPROBS = 20
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def bad(param: str, message: str) -> PydanticCustomError:
    """A cross-field error that still names its field (the error body's `param`)."""
    return PydanticCustomError("invalid_param", message, {"param": param})


# ---- shared request parts ---------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False  # one last chunk with `choices: []` and the usage
    continuous_usage_stats: bool = False  # vLLM: the running usage on every chunk


class FunctionDefinition(_Request):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    name: str
    description: str | None = None
    parameters: dict | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOOL_NAME.match(v):
            raise ValueError("a function name is 1-64 characters from a-z, A-Z, 0-9, '_', '.', '-'")
        return v


class Tool(_Request):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(_Request):
    name: str
    arguments: str | dict = "{}"  # OpenAI sends a JSON string; an object is accepted too


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # str, a list of {"type": "text", "text": str}, or None (assistant)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, "
                                     f"got {kind!r}")
            return v
        raise ValueError(f"content must be a string or a list of text parts, not {type(v).__name__}")

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant"):
            raise bad("content", f"a {self.role} message needs 'content'")
        if self.tool_calls and self.role != "assistant":
            raise bad("tool_calls", "only assistant messages can carry tool_calls")
        return self

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content


def _check_stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError("stop must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
    if any(not s for s in v):
        raise ValueError("stop strings must not be empty")
    return v


class _Sampling(_Request):
    """Fields common to chat and completions; None means "not given"."""

    model: str | None = None  # None: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: Any = Field(None, validate_default=True)  # str or list of str
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    logit_bias: dict[str, float] | None = None  # accepted only when empty (not implemented)
    user: str | None = None
    ignore_eos: bool = False  # vLLM: keep generating past end-of-sequence tokens
    skip_special_tokens: bool = True  # vLLM: drop control tokens from the text

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        return _check_stop(v)

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        return self


# ---- requests -----------------------------------------------------------------------------


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v is None or v in ("none", "auto", "required"):
            return v
        if (isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict)
                and isinstance(v["function"].get("name"), str)):
            return v
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, dict):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice["function"]["name"] not in names:
                raise bad("tool_choice", f"tool_choice names function {self.tool_choice['function']['name']!r}, "
                                         "which is not among the request's tools")
        if self.tool_choice == "required" and not self.tools:
            raise bad("tool_choice", "tool_choice 'required' needs at least one tool in 'tools'")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int = Field(16, ge=0)  # OpenAI's default; 0 only with echo (scoring)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v:
            if all(isinstance(s, str) for s in v):
                return v
            if all(type(t) is int for t in v):
                return v
            if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in v):
                return v
        if isinstance(v, list) and not v:
            raise ValueError("prompt is empty")
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of "
                         "lists of token ids")

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.suffix:
            raise bad("suffix", "suffix (fill-in-the-middle) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise bad("best_of", "best_of other than n is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise bad("max_tokens", "max_tokens must be at least 1 (0 is only allowed with echo, to score the prompt)")
        if self.stream and self.max_tokens == 0:
            raise bad("max_tokens", "max_tokens 0 (scoring) cannot be streamed")
        return self


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # with messages: rendered into the system turn
    add_special_tokens: bool = False  # accepted for vLLM compatibility (Qwen adds none)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise bad("prompt", "give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses ----------------------------------------------------------------------------


class _Response(BaseModel):
    def dump(self) -> dict:
        return self.model_dump(mode="json")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None


class FunctionCallOut(_Response):
    name: str
    arguments: str  # JSON text


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler):
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(_Response):
    """A streamed piece of the message; only the fields that were set are sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        out = handler(self)
        return {k: v for k, v in out.items() if k in self.model_fields_set}


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (nothing predicts it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen25"
    root: str | None = None
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str
