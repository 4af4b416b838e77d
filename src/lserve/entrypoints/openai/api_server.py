"""The FastAPI application and the uvicorn server behind `lserve serve`.

Routes are thin: they check the API key, hand the validated body to `OpenAIServing`, and turn
every failure into OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`):
validation failures are 400 (not FastAPI's 422), an unknown model 404, a missing or wrong key
401, a dead engine or a server shutting down 503. Only a real fault is a 500.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections; open requests may finish for
`--shutdown-timeout` seconds, then the rest are aborted in one engine job (streams get a chunk
with finish_reason "abort" and `[DONE]`, non-streaming requests a 503 error body), the engine
thread stops and the process exits.

A request body over `--max-request-bytes` is refused with 413 before it is read in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lserve import __version__
from lserve.entrypoints.openai.async_engine import (
    AsyncEngine,
    EngineDeadError,
    ShuttingDownError,
)
from lserve.entrypoints.openai.metrics import ServerMetrics
from lserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    VersionResponse,
)
from lserve.entrypoints.openai.serving import (
    APIError,
    OpenAIServing,
    error_body,
    run_until_disconnect,
)
from lserve.errors import LServeError, RequestRejected

logger = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 5.0


def _error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[^A-Za-z0-9_]")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the top-level field they are about.

    A value that fits no member of a union gets one error per member; per field, the deepest
    error is kept (`prompt.1: Input should be a valid integer` rather than "not a string"), and
    the union-member tags are dropped from its location.
    """
    best: dict[str, tuple[int, dict[str, Any]]] = {}
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('msg', '')}", None
        loc = [x for x in err.get("loc", ()) if x != "body"]
        key = str(loc[0]) if loc else ""
        if key not in best or len(loc) > best[key][0]:
            best[key] = (len(loc), err)
    if not best:
        return "invalid request body", None
    parts = []
    for _, err in list(best.values())[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _UNION_TAG.search(str(x))]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid value')}")
    more = f" (and {len(best) - 3} more)" if len(best) > 3 else ""
    first = next(iter(best))
    return "; ".join(parts) + more, first or None


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    503: {"model": ErrorResponse, "description": "the engine is dead or the server is shutting down"},
}
_STREAMING_200: dict[int | str, dict[str, Any]] = {
    200: {"description": "a JSON body, or server-sent events when stream is true",
          "content": {"text/event-stream": {"schema": {
              # OpenAPI 3.1: for an event stream, `schema` describes one event
              "type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "a JSON chunk (OpenAI's `text_completion` or "
                                      "`chat.completion.chunk`), an error object, or `[DONE]` (the last event)"},
                             "event": {"type": "string"}},
          }}}},
}


@dataclass
class ServerState:
    engine: AsyncEngine
    serving: OpenAIServing
    metrics: ServerMetrics
    api_key: str | None
    max_request_bytes: int = 32 * 2**20


class BodySizeLimit:
    """ASGI middleware: 413 with OpenAI's error body for a request body over `limit` bytes, from its
    Content-Length at once, or as soon as a body sent without one (chunked) passes the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"the request body is larger than {self.limit} bytes (--max-request-bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            exc = self._too_large()
            await JSONResponse(error_body(413, str(exc.detail)), status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()  # FastAPI passes HTTP exceptions from reading the body through
            return message

        await self.app(scope, limited, send)


def build_app(state: ServerState) -> FastAPI:
    """The ASGI application; the engine loop runs for the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        stats_task = asyncio.create_task(_log_stats_forever(state.engine))
        try:
            yield
        finally:
            stats_task.cancel()
            await state.engine.close()
            logger.info("engine stopped; every request ended and every KV page freed")

    app = FastAPI(title="lserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of lserve, a long-context LLM serving engine")
    app.add_middleware(BodySizeLimit, limit=state.max_request_bytes)
    app.state.lserve = state
    serving = state.serving

    async def check_api_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`", None)

    v1 = [Depends(check_api_key)]

    # ---- errors ----------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestRejected)
    async def _rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return _error_response(400, str(exc))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error_response(503, f"the engine is dead: {exc}")

    @app.exception_handler(ShuttingDownError)
    async def _stopping(_: Request, exc: ShuttingDownError) -> JSONResponse:
        return _error_response(503, str(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
        return _error_response(500, f"internal server error: {type(exc).__name__}")

    # ---- OpenAI endpoints ------------------------------------------------------------------

    @app.post("/v1/completions", dependencies=v1, response_model=CompletionResponse,
              responses={**_STREAMING_200, **_ERROR_RESPONSES})
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        """Text completion (OpenAI's legacy API), streamed as server-sent events when `stream` is true."""
        arrival = time.monotonic()
        _log_ignored(body)
        return await run_until_disconnect(raw, lambda: serving.create_completion(body, arrival))

    @app.post("/v1/chat/completions", dependencies=v1, response_model=ChatCompletionResponse,
              responses={**_STREAMING_200, **_ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        """Chat completion with the tokenizer's chat template, streamed when `stream` is true."""
        arrival = time.monotonic()
        _log_ignored(body)
        return await run_until_disconnect(raw, lambda: serving.create_chat_completion(body, arrival))

    @app.get("/v1/models", dependencies=v1, response_model=ModelList,
             responses={401: _ERROR_RESPONSES[401]})
    async def models() -> ModelList:
        return serving.models()

    # ---- vLLM's extra endpoints --------------------------------------------------------------

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await serving.detokenize(body)

    @app.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses={404: _ERROR_RESPONSES[404]})
    async def tokenizer_info() -> TokenizerInfoResponse:
        return serving.tokenizer_info()

    @app.get("/health", responses={200: {"description": "the engine is alive (empty body)", "content": None},
                                   503: {"model": ErrorResponse, "description": "the engine is dead"}})
    async def health() -> Response:
        if state.engine.is_dead:
            return _error_response(503, f"the engine is dead: {state.engine.dead_reason}")
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without its 422 responses: validation failures are 400 here."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            _document_runtime_limits(schema, serving.served_model_names, serving.vocab_size)
            app.openapi_schema = jsonable_encoder(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_REQUEST_SCHEMAS = ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest")


def _document_runtime_limits(schema: dict[str, Any], model_names: Sequence[str], vocab_size: int) -> None:
    """Put what only the running server knows into its schema: the model names and the vocabulary.

    The server refuses other names (404), token ids outside the vocabulary and empty prompts
    (400); saying so in /openapi.json lets clients, and the fuzz test, know it.
    """
    components = schema.get("components", {}).get("schemas", {})

    def bound(node: Any, nonempty: bool) -> None:
        if isinstance(node, list):
            for item in node:
                bound(item, nonempty)
        elif isinstance(node, dict):
            if node.get("type") == "integer":
                node.update(minimum=0, maximum=vocab_size - 1)
            elif node.get("type") == "string" and nonempty:
                node["minLength"] = 1
            elif node.get("type") == "array" and nonempty:
                node["minItems"] = 1
            for key in ("anyOf", "items"):
                if key in node:
                    bound(node[key], nonempty)

    for name in _REQUEST_SCHEMAS:
        props = components.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"] = {"anyOf": [{"enum": list(model_names)}, {"type": "null"}],
                              "description": props["model"].get("description", "a served model name")}
    bound(components.get("CompletionRequest", {}).get("properties", {}).get("prompt"), nonempty=True)
    bound(components.get("DetokenizeRequest", {}).get("properties", {}).get("tokens"), nonempty=False)


def _log_ignored(body: Any) -> None:
    extra = sorted(getattr(body, "model_extra", None) or {})
    if extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(extra))


async def _log_stats_forever(engine: AsyncEngine) -> None:
    """vLLM's periodic stats line, while anything happens."""
    last = engine.stats
    last_time = time.monotonic()
    while True:
        await asyncio.sleep(STATS_LOG_INTERVAL_S)
        now, s = time.monotonic(), engine.stats
        busy = s.num_running or s.num_waiting
        if busy or s.num_generation_tokens != last.num_generation_tokens:
            dt = now - last_time
            logger.info(
                "running: %d, waiting: %d, KV cache usage: %.1f%%, prompt: %.1f tok/s, generation: %.1f tok/s, "
                "preemptions: %d",
                s.num_running, s.num_waiting, 100 * s.kv_cache_usage,
                (s.num_prompt_tokens - last.num_prompt_tokens) / dt,
                (s.num_generation_tokens - last.num_generation_tokens) / dt, s.num_preemptions,
            )
        last, last_time = s, now


class _Server(uvicorn.Server):
    """uvicorn, plus a log line once listening and the drain of open requests on shutdown."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace_s: float, banner: str) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            logger.info("%s", self.banner)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        logger.info("shutting down: open requests get %.1f s to finish, then they are aborted", self.grace_s)
        # Runs alongside uvicorn's wait for open connections; once the grace period is over it aborts
        # what is left, which ends those responses cleanly, so uvicorn need not cut them.
        drain = asyncio.create_task(self.engine.drain(self.grace_s))
        try:
            await super().shutdown(sockets)
        finally:
            if not drain.done():
                drain.cancel()


def serve(
    engine_kwargs: dict[str, Any],
    host: str,
    port: int,
    served_model_names: Sequence[str] | None,
    api_key: str | None,
    shutdown_timeout: float,
    log_level: str = "info",
    max_request_bytes: int = 32 * 2**20,
    max_prompts_per_request: int = 128,
    tool_call_parser: str = "auto",
) -> int:
    """Load the model, then serve until SIGTERM/SIGINT; returns the exit status."""
    from lserve.engine.llm import LLM

    sock = _listen(host, port)  # before loading the model: a busy port fails in a second, not a minute
    logger.info("loading %s", engine_kwargs.get("model") or "the default model")
    try:
        llm = LLM(**engine_kwargs)
    except BaseException:
        sock.close()
        raise
    llm_engine = llm.llm_engine
    source = llm_engine.core.source
    model_arg = engine_kwargs.get("model")
    names = list(served_model_names or [model_arg or source.name])
    holder: dict[str, AsyncEngine] = {}
    metrics = ServerMetrics(names[0], lambda: holder["engine"].stats, llm_engine.max_model_len)
    engine = AsyncEngine(llm_engine, metrics)
    holder["engine"] = engine
    serving = OpenAIServing(engine, names, model_root=str(model_arg or source.path),
                            max_prompts_per_request=max_prompts_per_request, tool_call_parser=tool_call_parser)
    logger.info("tool calls: %s format (--tool-call-parser %s)", serving.tool_format.name, tool_call_parser)
    app = build_app(ServerState(engine, serving, metrics, api_key, max_request_bytes))
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on",
        # uvicorn cuts open connections only after this; the drain ends them before that
        timeout_graceful_shutdown=shutdown_timeout + 10.0,
    )
    shown_host = f"[{host}]" if ":" in host else host
    banner = (f"serving {names[0]} at http://{shown_host}:{port} (max_model_len {llm_engine.max_model_len}, "
              f"{engine.stats.kv_pages_total} KV pages, device {llm_engine.core.device})")
    _Server(config, engine, shutdown_timeout, banner).run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or LServeError saying why there cannot be one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise LServeError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise LServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock
