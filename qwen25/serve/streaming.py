"""Server-sent events as the OpenAI API streams them.

Wire format: one `data: <json>\\n\\n` event per chunk, then `data: [DONE]\\n\\n`. An error
after the 200 and the headers have gone out is sent as an event whose JSON has an "error"
key (the `openai` client raises `APIError` on it), still followed by `[DONE]`.

`SSEResponse` is a StreamingResponse that always runs `on_close` when the response ends,
however it ends: finished, client gone before the first byte, or cancelled mid-stream. The
generator's own `finally` does not run if the client left before iteration began, and a
job that nobody reads must still be cancelled.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse

from qwen25.serve.errors import error_from_exception

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def with_error_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Pass `chunks` through; an exception becomes an error event; always end with [DONE]."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # noqa: BLE001 - every failure must reach the client as an event
        err = error_from_exception(e)
        yield event(err.body())
    finally:
        await chunks.aclose()
    yield DONE


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(with_error_events(chunks), headers=HEADERS)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()

