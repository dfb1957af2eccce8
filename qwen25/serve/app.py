"""The FastAPI application: routes, body parsing, API keys, error mapping, lifecycle.

    state = ServerState(engine, tokenizer, ServerConfig(served_model_name="qwen2.5-0.5b"))
    app = create_app(state)                     # any ASGI server can run it
    run(state, host="127.0.0.1", port=8000)     # uvicorn with graceful SIGTERM

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}],
GET /health, GET /version, GET /metrics, and vLLM's POST /tokenize, POST /detokenize,
GET /tokenizer_info (lm-evaluation-harness uses them as a remote tokenizer).

Bodies are read and parsed here, not by FastAPI's parameter binding, so that every failure
(not JSON, not an object, too large, a field of the wrong type) is a 400/413 with the
OpenAI error body and the offending field as `param`. With API keys configured, every
/v1 route and POST /tokenize and /detokenize need `Authorization: Bearer KEY` (compared in
constant time): those two do work proportional to what a caller sends, so an anonymous
caller could load the server with them (vLLM leaves them open; we do not). /health,
/version, /metrics and /tokenizer_info stay open: they are cheap and read only. Both
tokenizer routes run in a worker thread (the event loop keeps serving streams meanwhile);
/tokenize takes at most the body limit, /detokenize at most MAX_DETOKENIZE ids.

Shutdown: on SIGTERM the server stops accepting connections, answers 503 to requests that
still arrive on open connections, lets running requests finish for up to `shutdown_timeout`
seconds, stops the engine thread and exits with status 0. Requests still running at the
timeout are failed by the engine thread, not cut by uvicorn: a stream gets an error event
(503 `shutting_down`) and `data: [DONE]`, a non-streaming request the 503 JSON error body.
Only a response that cannot be written even then (a client that stops reading) is cancelled
by uvicorn, ABORT_GRACE_S later.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from contextlib import asynccontextmanager

import pydantic
import pydantic_core
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse

import qwen25
from qwen25.serve.chat import build_prompt, create_chat_completion, template_message
from qwen25.serve.completions import create_completion
from qwen25.serve.errors import APIError, error_from_exception, invalid
from qwen25.serve.metrics import CONTENT_TYPE
from qwen25.serve.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                  ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from qwen25.serve.state import ServerState, check_accepting

log = logging.getLogger("qwen25.serve")
MAX_DETOKENIZE = 1 << 20  # ids per /detokenize request (a decode of 2M ids takes about a second)
KEYED_ROUTES = ("/tokenize", "/detokenize")  # outside /v1 but keyed (see the module docstring)
ABORT_GRACE_S = 5.0  # after aborting at the shutdown timeout: time to send the error bodies
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version", "/metrics",
          "/tokenize", "/detokenize", "/tokenizer_info")


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ---- request bodies -------------------------------------------------------------------------


async def read_body(http: HTTPRequest, limit: int) -> dict:
    """The JSON object of the body; 413 past `limit` bytes, 400 for anything but an object."""
    return parse_body(await read_raw(http, limit))


async def read_raw(http: HTTPRequest, limit: int) -> bytes:
    """The body's bytes; 413 past `limit` bytes."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {declared} bytes; the limit is {limit}.", code="request_too_large")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than the limit of {limit} bytes.",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(raw: bytes) -> dict:
    """The JSON object in `raw`; 400 for anything but an object."""
    if not raw.strip():
        raise invalid("The request body is empty; send a JSON object.")
    try:
        body = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        raise invalid(f"The request body is not valid JSON ({e}); send a JSON object with Content-Type: "
                      "application/json.") from None
    if not isinstance(body, dict):
        raise invalid(f"The request body must be a JSON object, not {_JSON_TYPES.get(type(body), 'that')}.")
    return body


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _param(loc: tuple) -> str | None:
    """pydantic's error location -> the OpenAI `param` ("messages[0].content")."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += ("." if out else "") + part
        # other parts name union branches or validators: not part of the path
    return out or None


def validate(model: type[pydantic.BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = first["loc"]
        if first["type"] == "invalid_param":  # a cross-field check names its own field
            loc = (*loc, first["ctx"]["param"])
        param = _param(loc)
        msg = first["msg"].removeprefix("Value error, ")
        raise invalid(f"{param}: {msg}" if param else msg, param=param) from None


# ---- the application --------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        log.info("engine thread started: batch %d, context %d, decode %s", state.engine.max_batch_size,
                 state.max_model_len, state.engine.decode_path)
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="qwen25", version=qwen25.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"Unknown route {request.url.path}; see GET /v1/models and POST /v1/chat/completions.",
                   405: f"Method {request.method} is not allowed on {request.url.path}."}.get(exc.status_code,
                                                                                             str(exc.detail))
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return error_response(invalid(str(exc.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return error_response(error_from_exception(exc))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await read_body(http, state.config.max_body_bytes)
        return await create_chat_completion(state, validate(ChatCompletionRequest, body), body, http)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_body(http, state.config.max_body_bytes)
        return await create_completion(state, validate(CompletionRequest, body), http)

    def card() -> ModelCard:
        return ModelCard(id=state.config.served_model_name, created=state.started,
                         root=state.config.model_path or None, max_model_len=state.max_model_len)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return ModelList(data=[card()]).dump()

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str):
        state.resolve_model(model_id)
        return card().dump()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.worker.fatal is not None or not state.worker.alive:
            return error_response(APIError(503, "The engine is not running.", code="engine_dead"))
        if state.draining:
            return error_response(APIError(503, "The server is shutting down.", code="shutting_down"))
        return {"status": "ok"}

    @app.api_route("/version", methods=["GET", "HEAD"])
    async def version():
        return {"version": qwen25.__version__}

    @app.get("/metrics")
    async def metrics():
        def gauges():
            running, waiting = state.worker.counts()
            return {"qwen25_num_requests_running": ("Requests generating tokens.", running),
                    "qwen25_num_requests_waiting": ("Requests queued for a slot or being prefilled.", waiting)}
        return PlainTextResponse(state.metrics.render(gauges), media_type=CONTENT_TYPE)

    # The tokenizer routes parse, validate, encode and render their JSON in a worker thread:
    # a 10 MB body or a million ids takes seconds, which the event loop (every stream's
    # tokens, /health) must not wait for.
    def tokenize_sync(raw: bytes) -> JSONResponse:
        body = parse_body(raw)
        req = validate(TokenizeRequest, body)
        state.resolve_model(req.model)
        if req.prompt is not None:
            ids = state.tokenizer.encode(req.prompt, allow_special=True)
        else:
            messages = [template_message(m) for m in req.messages]
            ids = build_prompt(state.tokenizer, messages, body.get("tools") or None, "")
        return JSONResponse(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len).dump())

    def detokenize_sync(raw: bytes) -> JSONResponse:
        req = validate(DetokenizeRequest, parse_body(raw))
        state.resolve_model(req.model)
        if len(req.tokens) > MAX_DETOKENIZE:
            raise invalid(f"tokens: {len(req.tokens)} ids is more than the {MAX_DETOKENIZE} one request may "
                          "decode; split the list", param="tokens")
        vocab = len(state.tokenizer)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(f"token id {bad} is out of vocabulary (0..{vocab - 1})", param="tokens")
        return JSONResponse(DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens)).dump())

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest):
        return await run_in_threadpool(tokenize_sync, await read_raw(http, state.config.max_body_bytes))

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest):
        return await run_in_threadpool(detokenize_sync, await read_raw(http, state.config.max_body_bytes))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tokenizer
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "chat_template": tok.chat_template, "model_max_length": state.max_model_len,
                "tokenizer_class": "Qwen2Tokenizer"}

    return app


class _Gate:
    """Pure ASGI middleware: API keys on /v1, 503 while draining, per-route HTTP counts."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.keys = [k.encode() for k in state.config.api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = None
            keyed = path.startswith("/v1/") or path in KEYED_ROUTES
            if self.keys and keyed and scope["method"] != "OPTIONS" and not self._authorized(scope):
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key")
            elif scope["method"] == "POST":
                try:
                    check_accepting(self.state)
                except APIError as e:
                    error = e
            if error is not None:
                return await error_response(error)(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.count_http(route, status[0])

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(token, key)
        return ok


# ---- running it ---------------------------------------------------------------------------


def build_server(state: ServerState, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
                 log_level: str = "info"):
    """A uvicorn.Server for `state` with the shutdown of the module docstring: draining at
    the exit signal, and at `shutdown_timeout` every running request failed with a 503
    that reaches its client (error event + [DONE], or the JSON error body)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # at once, before uvicorn's loop notices the signal
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            state.draining = True  # also when the exit came from should_exit, not a signal
            timer = asyncio.get_running_loop().call_later(shutdown_timeout, _abort_running)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    def _abort_running() -> None:
        running, waiting = state.worker.counts()
        log.warning("shutdown timeout (%.1f s) reached: aborting %d running and %d waiting requests",
                    shutdown_timeout, running, waiting)
        state.worker.abort(APIError(503, f"The server shut down before the request finished (it waited "
                                         f"{shutdown_timeout:g} s for running requests).", code="shutting_down"))

    # uvicorn's own timeout comes later: by then the aborted requests have sent their errors
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + ABORT_GRACE_S,
                            access_log=log_level == "debug")
    return Server(config)


def run(state: ServerState, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
        log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT; then drain (see the module docstring) and return."""
    server = build_server(state, host, port, shutdown_timeout, log_level)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in
    # place that re-raise is a no-op, so a SIGTERM ends the process with status 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
