"""OpenAI-compatible HTTP server over the engine, with continuous batching (`qwen25 serve`).

- `schemas.py`: pydantic models of every request and response;
- `errors.py`: the OpenAI error body and the exception -> status mapping;
- `worker.py`: the thread that owns the engine and admits requests between decode steps;
- `chat.py`, `completions.py`: the two generation endpoints; `openai_tools.py`: tool calls;
- `streaming.py`: server-sent events; `metrics.py`: Prometheus text;
- `state.py`: shared state and request -> engine translation; `app.py`: routes and `run`.

    from qwen25.serve import ServerConfig, ServerState, create_app, run
"""

from qwen25.serve.app import create_app, run
from qwen25.serve.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "ServerState", "create_app", "run"]
