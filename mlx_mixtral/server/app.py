"""The OpenAI-compatible HTTP app: routes and error objects (the guards before routing are in guard.py).

    GET  /                      the browser chat page (mlx_mixtral/server/static/)
    GET  /health                liveness and worker statistics
    GET  /v1/models[/{id}]      the one served model
    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        legacy text completion, streamed or not
    GET  /openapi.json          the OpenAPI document of the above

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx status for
anything the request did wrong; tracebacks never reach the client. Nothing a request says reaches
the filesystem: the model is fixed when the server starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_mixtral.generate import GenerationResponse, prompt_ids
from mlx_mixtral.sampling import validate_token_ids
from mlx_mixtral.server.body import JSONBodyRoute
from mlx_mixtral.server.guard import LOOPBACK_HOSTS, Guard, error_response
from mlx_mixtral.server.protocol import APIError, ChatAnswer, CompletionAnswer, Limits, request_options, sse
from mlx_mixtral.server.schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from mlx_mixtral.server.tools import structured_options
from mlx_mixtral.server.worker import Finished, Job, ShuttingDown, Worker
from mlx_mixtral.tokenizer.core import Tokenizer
from mlx_mixtral.tool_calls import ToolCallStream

log = logging.getLogger("mlx_mixtral.server")
STATIC_DIR = Path(__file__).parent / "static"
# The page loads nothing from elsewhere (it works offline) and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
ERROR_STATUSES = {
    400: "bad input",
    401: "missing or wrong API key",
    404: "unknown model",
    413: "request body too large",
    500: "server fault",
    503: "the server is shutting down",
}


@dataclass
class Settings:
    model_id: str
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_tokens_cap: int = 4096
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_kv_size: int | None = None  # as the worker's caches: a sliding window has no context limit
    chat_template: str | None = None
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS  # None: any Host header


# pydantic names the member of a union that failed ('str', 'list[int]') in an error's location.
_UNION_TAG = re.compile(r"(str|int|float|bool|list|dict)(\[.*\])?|.*[\[(].*")


def _param(loc: tuple) -> str | None:
    """('body', 'prompt', 'list[int]', 0) -> 'prompt[0]': the field, as OpenAI's `param` names it."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_TAG.fullmatch(part):
            out += f".{part}" if out else part
    return out or None


class EventStream(StreamingResponse):
    """Server-sent events whose job is cancelled however the response ends: finished, failed, or
    cut short because the client disconnected (Starlette then cancels the streaming task)."""

    def __init__(self, job: Job, events: AsyncIterator[str]):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


DISCONNECT_POLL_S = 0.25


async def _responses(job: Job, request: Request | None) -> AsyncIterator[GenerationResponse]:
    """The job's generation responses until it finishes. With `request` (non-streaming), a client
    that disconnects is noticed within DISCONNECT_POLL_S; streams rely on EventStream."""
    checked = time.monotonic()
    try:
        while True:
            if request is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, Finished):
                if isinstance(event.error, ShuttingDown):
                    raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
                if event.error is not None:
                    raise APIError(500, "generation failed; see the server log", type="server_error")
                return
            yield event
    finally:
        job.cancel()


def create_app(worker: Worker, settings: Settings) -> FastAPI:
    """The app serving the model `worker` loaded; the worker stops with the app."""
    model, tokenizer = worker.model, worker.tokenizer
    # A sliding-window cache never runs out of room; an unbounded one ends at the model's context.
    context = None if settings.max_kv_size is not None else model.args.max_position_embeddings
    limits = Limits(settings.max_tokens_cap, context, model.args.vocab_size)
    started = int(time.time())
    errors = {code: {"model": ErrorResponse, "description": why} for code, why in ERROR_STATUSES.items()}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="mlx-mixtral",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        description="OpenAI-compatible API for one local model.",
        responses=errors,
    )
    app.router.route_class = JSONBodyRoute  # bodies parsed by the text rule and the JSON grammar
    app.state.worker = worker
    app.add_middleware(Guard, settings=settings)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(APIError)
    async def apierror_response(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response(
                400, f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
            )
        param = _param(tuple(first.get("loc", ())))
        return error_response(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), code=None)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error; see the server log", type="server_error")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {settings.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def card() -> dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": started, "owned_by": "mlx-mixtral"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_id,
            "busy": worker.busy,
            "queued": worker.queued,
            **worker.stats,
            "prompt_cache_entries": worker.engine.cache_entries(),
            "offload": None if model.offload is None else model.offload.stats.as_dict(),
        }

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model_card(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return card()

    def stream_doc(chunk: str) -> dict:
        return {
            200: {
                "content": {"text/event-stream": {"schema": _event_schema(chunk)}},
                "description": f"JSON, or server-sent events of {chunk} when `stream` is true",
            }
        }

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=stream_doc("ChatCompletionChunk"))
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        if len(req.messages) > settings.max_messages:
            raise APIError(
                400,
                f"messages has {len(req.messages)} entries; this server allows at most {settings.max_messages}",
                param="messages",
            )
        messages = [m.for_template() for m in req.messages]
        structured = structured_options(req)
        tools = structured["tools"] if structured["tool_choice"] != "none" else None
        try:
            ids = await run_in_threadpool(
                partial(tokenizer.apply_chat_template, tools=tools), messages, True, settings.chat_template
            )
        except ValueError as e:  # the chat format refused the conversation (order of roles, ...)
            raise APIError(400, f"messages: {e}", param="messages") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        options = request_options(req, len(ids), max_tokens, limits, top, structured)
        options["tool_format"] = tool_format = tokenizer.tool_format(settings.chat_template)
        calls = ToolCallStream(tool_format, tokenizer.tool_calls_id) if tools else None
        answer = ChatAnswer(settings.model_id, tokenizer, len(ids), top, calls)
        return await respond(ids, options, answer, req, request)

    @app.post("/v1/completions", response_model=Completion, responses=stream_doc("Completion"))
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        if req.echo or req.suffix is not None:
            raise APIError(400, "echo and suffix are not supported", param="echo" if req.echo else "suffix")
        ids = await run_in_threadpool(_completion_prompt, tokenizer, req.prompt, limits.vocab_size)
        options = request_options(req, len(ids), req.max_tokens, limits, req.logprobs)
        options["continuation"] = True  # a completion continues the prompt's text: keep its first space
        answer = CompletionAnswer(settings.model_id, tokenizer, len(ids), req.logprobs)
        return await respond(ids, options, answer, req, request)

    async def respond(
        ids: list[int],
        options: dict[str, Any],
        answer: ChatAnswer | CompletionAnswer,
        req: ChatCompletionRequest | CompletionRequest,
        request: Request,
    ) -> Any:
        """Queue one generation; stream its events, or wait and return the whole answer."""
        job = Job(ids, options, asyncio.get_running_loop())
        worker.submit(job)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return EventStream(job, _events(job, answer, include_usage))
        async for r in _responses(job, request):
            answer.add(r)
        return answer.response(job.cached_tokens)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # The streamed chunk is documented only inside the event-stream schema; add its definition.
            chunk = ChatCompletionChunk.model_json_schema(
                ref_template="#/components/schemas/{model}", mode="serialization"
            )
            schemas = doc["components"]["schemas"]
            for name, definition in chunk.pop("$defs", {}).items():
                schemas.setdefault(name, definition)
            schemas["ChatCompletionChunk"] = chunk
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


def _event_schema(chunk: str) -> dict[str, Any]:
    """One server-sent event: `data` is a JSON chunk (or an error object), and the last is [DONE]."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {
            "anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]
        },
    }
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def _completion_prompt(tokenizer: Tokenizer, prompt: Any, vocab_size: int) -> list[int]:
    """Token ids of a completions prompt: text (encoded with BOS) or ids; a list holds one prompt."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(
                400, f"prompt holds {len(prompt)} prompts; this server takes one per request", param="prompt"
            )
        prompt = prompt[0]
    ids = prompt_ids(tokenizer, prompt)
    if not ids:
        raise APIError(400, "prompt is empty", param="prompt")
    try:
        validate_token_ids(ids, vocab_size, "prompt")
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None
    return ids


async def _events(job: Job, answer: ChatAnswer | CompletionAnswer, include_usage: bool) -> AsyncIterator[str]:
    """The answer's events, then the usage if asked for, then [DONE]. A failure after the 200 status
    went out can only be told in the stream: an error object as the last event before [DONE]."""
    for event in answer.opening():
        yield event
    try:
        async for r in _responses(job, None):
            for event in answer.stream(r):
                yield event
    except APIError as e:
        yield sse(e.body())
    else:
        if include_usage:
            yield answer.usage_chunk(job.cached_tokens)
    yield sse("[DONE]")
