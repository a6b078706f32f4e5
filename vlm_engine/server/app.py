"""The OpenAI-compatible HTTP API over one `AsyncEngine`.

`build_app(engine, config)` gives a FastAPI app with `POST /v1/chat/completions`,
`POST /v1/completions`, `GET /v1/models`, `GET /health` and `GET /metrics`. Every error is an
OpenAI error body (`{"error": {"message", "type", "param", "code"}}`): 400 for bad input (the
engine's `InvalidInputError` message), 401 without the API key, 404 for an unknown model or path,
413 for a body over `max_request_bytes`, 503 (with `Retry-After`) when more requests wait than
`max_waiting` or the engine is dead; an unexpected failure is a 500 without a traceback. A
client that disconnects aborts its request at once, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm_engine.async_engine import AsyncEngine
from vlm_engine.errors import EngineDeadError, InvalidInputError
from vlm_engine.server import protocol as p
from vlm_engine.server.media import MediaPolicy
from vlm_engine.server.metrics import CONTENT_TYPE, ServerMetrics
from vlm_engine.server.streams import ChatStream, CompletionStream, RequestRun

logger = logging.getLogger("vlm_engine")
T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_request_bytes: int = 32 * 2**20
    max_waiting: int | None = None  # waiting requests past which new ones get a 503
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def error_response(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=kind, param=param, code=code))
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics()
    state: dict[str, httpx.AsyncClient | None] = {"http": None}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.media.allow_remote:
            state["http"] = httpx.AsyncClient(follow_redirects=False)
        yield
        if state["http"] is not None:
            await state["http"].aclose()

    app = FastAPI(title="vlm_engine", version="1", lifespan=lifespan)
    app.add_middleware(_BodyLimit, max_bytes=config.max_request_bytes)
    _add_error_handlers(app)
    authorized = _auth_dependency(config.api_key)

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist",
                "invalid_request_error",
                "model_not_found",
            )

    def check_capacity() -> None:
        if not engine.is_healthy:
            raise EngineDeadError("the engine is not serving")
        waiting = engine.num_unfinished - engine.engine.config.max_num_seqs
        if config.max_waiting is not None and waiting >= config.max_waiting:
            raise APIError(503, "too many requests are waiting; retry later", "service_unavailable")

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            return error_response(503, "the engine is not serving", "service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_text() -> Response:
        stats = await engine.stats() if engine.is_healthy else {}
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> p.ModelList:
        card = p.ModelCard(
            id=config.model_name, created=_STARTED, max_model_len=engine.engine.max_model_len
        )
        return p.ModelList(data=[card])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_capacity()
        stream = ChatStream(engine, body, config, metrics, state["http"])
        return await _answer(stream, body.stream, request)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", "invalid_request_error")
        check_capacity()
        stream = CompletionStream(engine, body, config, metrics)
        return await _answer(stream, body.stream, request)

    return app


_STARTED = int(time.time())


async def _answer(run: RequestRun, stream: bool, request: Request) -> Response:
    """Start the request (bad input raises here, before any byte is sent), then answer it whole
    or as server-sent events."""
    await run.start()
    if stream:
        return StreamingResponse(run.events(), media_type="text/event-stream")
    body = await _until_disconnected(request, run.whole())
    return JSONResponse(body)


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or `ClientGone` (work cancelled, which aborts its requests) as soon as
    the client disconnects."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


def _auth_dependency(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorized(request: Request) -> None:  # async: FastAPI runs it on the loop
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(
                401, "a valid API key is required", "authentication_error", "invalid_api_key"
            )

    return authorized


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return error_response(e.status, str(e), e.kind, code=e.code)

    @app.exception_handler(InvalidInputError)
    async def invalid_input(request: Request, e: InvalidInputError) -> Response:
        return error_response(400, str(e), "invalid_request_error", _param_of(e), type(e).__name__)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError) -> Response:
        return error_response(503, str(e), "service_unavailable")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg")
        return error_response(
            400, message or "invalid request", "invalid_request_error", where or None
        )

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, e: _TooLarge) -> Response:
        return error_response(413, str(e), "invalid_request_error", code="request_too_large")

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        logger.exception("request failed")
        return error_response(500, "internal error", "internal_error")


def _param_of(error: InvalidInputError) -> str | None:
    """The sampling field an `InvalidSamplingParamsError` names first, if any (dotted for a
    field inside another, e.g. ``structured_outputs.json``)."""
    word = str(error).split(" ", 1)[0].rstrip(":")
    return word if all(part.isidentifier() for part in word.split(".")) else None


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """413 for a request body over `max_bytes`, declared or as it arrives."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(
                413, f"the request body is larger than {limit} bytes", "invalid_request_error",
                code="request_too_large",
            )  # fmt: skip
            return await response(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge(f"the request body is larger than {limit} bytes")
            return message

        return await self.app(scope, counted, send)
