"""OpenAI-shaped errors: one exception type, one body shape, one status mapping.

Every error the server sends, from a malformed body to a crashed engine, has the body the
`openai` client parses (reliability.md §1.1):

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Status codes follow OpenAI: 400 malformed or invalid request (`context_length_exceeded`
among them), 401 missing or wrong API key, 404 unknown model or route, 405 wrong method,
413 body too large, 429 queue full, 500 a bug of ours, 503 shutting down or engine dead.
A client's mistake is never a 5xx: the client retries 5xx, and a retried bad request only
adds load. `error_from_exception` is the single place that maps exceptions to statuses.
"""

from __future__ import annotations

import logging

from qwen25.errors import UserError

log = logging.getLogger("qwen25.serve")

# status -> OpenAI error type (what api.openai.com sends for each status)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to send to the client as `{"error": {...}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 for a request that is well-formed JSON but asks for something invalid."""
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(limit: int, prompt_tokens: int, max_tokens: int | None, param: str) -> APIError:
    """400 with OpenAI's `context_length_exceeded` code (vLLM's wording of the numbers)."""
    if max_tokens is None:
        msg = (f"This model's maximum context length is {limit} tokens. However, your request has "
               f"{prompt_tokens} input tokens. Please reduce the length of the input.")
    else:
        msg = (f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
               f"maximum context length is {limit} tokens and your request has {prompt_tokens} input "
               f"tokens ({max_tokens} > {limit} - {prompt_tokens}).")
    return APIError(400, msg, param=param, code="context_length_exceeded")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist. GET /v1/models lists the served model.",
                    param="model", code="model_not_found")


def queue_full(limit: int) -> APIError:
    return APIError(429, f"The server is at capacity: {limit} requests are already waiting. "
                         "Retry after a short wait.", code="rate_limit_exceeded")


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down and accepts no new requests.", code="shutting_down")


def error_from_exception(exc: BaseException) -> APIError:
    """The APIError for any exception raised while serving a request.

    UserError (bad input caught by the tokenizer, chat template or engine) is the client's
    mistake: 400. Anything else is our bug: 500, logged with its traceback, and the message
    sent to the client names no internals.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UserError):
        return invalid(str(exc))
    log.error("internal error while serving a request", exc_info=exc)
    return APIError(500, f"Internal server error ({type(exc).__name__}); the server log has the details.",
                    code="internal_error")
