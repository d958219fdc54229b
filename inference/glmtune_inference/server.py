"""The HTTP server: OpenAI-compatible `POST /v1/chat/completions` (streamed as SSE or not), `GET /v1/models`,
the seed project's `POST /`, and `/healthz`, `/readyz`, `/metrics`.

Requests only name served models (never paths); every limit a client can exceed answers 422 naming the
field, a full queue 429 and a draining server 503, both with Retry-After; a request whose KV cache could never
fit the server's KV budget, or whose forward ran out of device memory, 503. `DrainingServer` gives a
terminating pod a drain notice: for a few seconds after SIGTERM it still listens but takes no new work
(503 + Retry-After, /readyz 503), so the Service drops it and clients retry elsewhere instead of meeting a
refused connection; then uvicorn's graceful shutdown lets open requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import FrameType

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from glmtune.errors import InvalidInputError
from glmtune_inference.access_log import AccessLogMiddleware
from glmtune_inference.api_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    SeedRequest,
    SeedResponse,
    Usage,
)
from glmtune_inference.generation import GenerationParams
from glmtune_inference.loading import ServedModel
from glmtune_inference.metrics import ServerMetrics
from glmtune_inference.scheduler import (
    OUT_OF_MEMORY,
    Engine,
    EngineUnavailableError,
    Finished,
    GenerationHandle,
    QueueFullError,
    TextDelta,
)


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of one server (CLI flags set them)."""

    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 2048
    default_max_tokens: int = 512
    request_timeout_s: float = 300.0
    api_key: str | None = None
    log_prompts: bool = False
    retry_after_s: int = 1
    ready_cache_s: float = 5.0
    drain_timeout_s: float = 30.0


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def field_error(loc: Sequence[str | int], message: str) -> RequestValidationError:
    """A 422 naming the request field, in FastAPI's own validation-error format."""
    return RequestValidationError([{"loc": tuple(loc), "msg": message, "type": "value_error"}])


_ERRORS = {status: {"model": ErrorResponse} for status in (401, 404, 429, 503, 504)}
_bearer = HTTPBearer(auto_error=False)


def create_app(engine: Engine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The FastAPI app over `engine`; starts the engine on startup and drains it on shutdown."""
    metrics = ServerMetrics()
    metrics.track_engine(lambda: engine.queue_depth, lambda: engine.running)
    metrics.track_memory(engine)
    engine.step_observer = metrics.batch_size.observe
    engine.finish_observer = metrics.observe_finished
    ready = {"at": 0.0}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, settings.drain_timeout_s)

    app = FastAPI(title="glmtune inference", version="1", lifespan=lifespan)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = ErrorResponse(error=ErrorDetail(message=str(exc), type=exc.kind, param=exc.param))
        return JSONResponse(body.model_dump(), status_code=exc.status, headers=exc.headers)

    async def authorized(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if settings.api_key is None:
            return
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    def served_model(name: str, loc: str) -> ServedModel:
        served = engine.models.get(name)
        if served is None:
            raise ApiError(404, f"model {name!r} is not served here (GET /v1/models lists them)",
                           "invalid_request_error", param=loc)
        return served

    def prompt_ids(served: ServedModel, query: str, history: Sequence[tuple[str, str]], system: str | None,
                   loc: Sequence[str]) -> list[int]:
        try:
            ids = served.encode(query, history, system)
        except UnicodeError:
            raise field_error(loc, "text is not valid Unicode") from None
        limit = min(settings.max_prompt_tokens, served.context_length - 1)
        if len(ids) > limit:
            raise field_error(loc, f"the prompt is {len(ids)} tokens; this server takes at most {limit}")
        return ids

    def make_params(served: ServedModel, **kwargs) -> GenerationParams:
        try:
            return served.params(**kwargs)
        except InvalidInputError as exc:
            raise field_error(("body", exc.where or "body"), str(exc)) from None

    def submit(name: str, ids: list[int], params: GenerationParams) -> GenerationHandle:
        retry = {"Retry-After": str(settings.retry_after_s)}
        try:
            return engine.submit(name, ids, params, timeout_s=settings.request_timeout_s)
        except QueueFullError as exc:
            raise ApiError(429, f"server busy: {exc}", "rate_limit_error", headers=retry) from None
        except EngineUnavailableError as exc:
            raise ApiError(503, str(exc), "server_unavailable", headers=retry) from None

    async def collect(request: Request, handle: GenerationHandle, start: float) -> Finished:
        """Wait for the whole answer, cancelling generation if the client goes away first."""

        async def cancel_on_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            handle.cancel()

        watcher = asyncio.create_task(cancel_on_disconnect())
        first = None
        try:
            async for event in handle:
                if isinstance(event, TextDelta) and first is None:
                    first = time.perf_counter()
                    metrics.ttft.observe(first - start)
                elif isinstance(event, Finished):
                    finish(request, handle, event, first)
                    return _raise_unless_complete(event)
        finally:
            watcher.cancel()
        raise ApiError(500, "generation ended without a result", "server_error")

    def finish(request: Request, handle: GenerationHandle, done: Finished, first: float | None) -> None:
        if first is not None and done.completion_tokens > 1:
            metrics.token_time.observe((time.perf_counter() - first) / (done.completion_tokens - 1))
        access = {"request_id": handle.id, "model": handle.model, "prompt_tokens": done.prompt_tokens,
                  "completion_tokens": done.completion_tokens, "finish_reason": done.reason}
        if settings.log_prompts:
            access["response"] = done.text
        request.state.access.update(access)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=[Depends(authorized)],
              responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        start = time.perf_counter()
        served = served_model(body.model, "model")
        query, history, system = conversation(body.messages)
        ids = prompt_ids(served, query, history, system, ("body", "messages"))
        max_tokens = body.max_completion_tokens or body.max_tokens or min(settings.default_max_tokens,
                                                                          settings.max_tokens_limit)
        if max_tokens > settings.max_tokens_limit:
            raise field_error(("body", "max_tokens"), f"at most {settings.max_tokens_limit} on this server")
        options = {"max_new_tokens": max_tokens, "stop": body.stop_sequences(), "seed": body.seed}
        if body.temperature is not None:
            options.update(temperature=body.temperature, do_sample=body.temperature > 0)
        for key in ("top_p", "top_k", "repetition_penalty"):
            if getattr(body, key) is not None:
                options[key] = getattr(body, key)
        params = make_params(served, **options)
        if settings.log_prompts:
            request.state.access["prompt"] = [m.model_dump() for m in body.messages]
        handle = submit(body.model, ids, params)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(request, handle, completion_id, created, usage, start)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = await collect(request, handle, start)
        return ChatCompletion(
            id=completion_id, created=created, model=body.model,
            choices=[Choice(message=AssistantMessage(content=done.text), finish_reason=done.reason)],
            usage=_usage(done),
        )

    async def stream_events(request: Request, handle: GenerationHandle, completion_id: str, created: int,
                            include_usage: bool, start: float) -> AsyncIterator[str]:
        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(id=completion_id, created=created, model=handle.model, choices=choices,
                                       usage=usage)
            return f"data: {body.model_dump_json(exclude_none=usage is None)}\n\n"

        done, first = None, None
        try:
            yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
            async for event in handle:
                if isinstance(event, TextDelta):
                    if first is None:
                        first = time.perf_counter()
                        metrics.ttft.observe(first - start)
                    yield chunk([ChunkChoice(delta=Delta(content=event.text))])
                else:
                    done = event
            finish(request, handle, done, first)
            if done.reason in ("stop", "length"):
                yield chunk([ChunkChoice(delta=Delta(), finish_reason=done.reason)])
                if include_usage:
                    yield chunk([], usage=_usage(done))
            else:
                error = ErrorResponse(error=_incomplete(done))
                yield f"data: {error.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if done is None:  # the client went away (or the server is stopping): stop generating for it
                handle.cancel()

    @app.post("/", response_model=SeedResponse, dependencies=[Depends(authorized)], responses=_ERRORS)
    async def seed_generate(body: SeedRequest, request: Request) -> SeedResponse:
        start = time.perf_counter()
        name = body.model or engine.default_model
        served = served_model(name, "model")
        history = [tuple(pair) for pair in body.history]
        ids = prompt_ids(served, body.prompt, history, None, ("body", "prompt"))
        if len(ids) >= body.max_length:
            raise field_error(("body", "max_length"), f"must exceed the prompt's {len(ids)} tokens")
        params = make_params(served, max_length=body.max_length, top_p=body.top_p, temperature=body.temperature,
                             do_sample=body.temperature > 0, max_new_tokens=settings.max_tokens_limit)
        done = await collect(request, submit(name, ids, params), start)
        return SeedResponse(response=done.text, history=[*history, (body.prompt, done.text)], status=200,
                            time=time.strftime("%Y-%m-%d %H:%M:%S"))

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)], responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=m.name, created=m.created) for m in engine.models.values()])

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        if not engine.accepting:
            raise ApiError(503, "not accepting requests", "server_unavailable",
                           headers={"Retry-After": str(settings.retry_after_s)})
        if time.monotonic() - ready["at"] > settings.ready_cache_s:
            served = engine.models[engine.default_model]
            try:
                handle = submit(served.name, served.encode("你好"), served.params(do_sample=False, max_new_tokens=1))
            except ApiError as exc:
                if exc.status != 429:
                    raise
                # Busy (the queue is full) means it is serving: failing readiness now would take a
                # loaded pod out of the Service exactly when it is needed.
                return {"status": "ready", "models": list(engine.models), "busy": True}
            async for event in handle:
                if isinstance(event, Finished) and event.reason not in ("stop", "length"):
                    raise ApiError(503, f"test generation failed ({event.reason})", "server_unavailable")
            ready["at"] = time.monotonic()
        return {"status": "ready", "models": list(engine.models)}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain notice of `notice_s` seconds between SIGTERM/SIGINT and its own shutdown, during
    which the engine refuses new requests (503) and finishes the ones it has; a second signal skips the notice."""

    def __init__(self, config: uvicorn.Config, engine: Engine, notice_s: float = 0.0) -> None:
        super().__init__(config)
        self.engine, self.notice_s = engine, notice_s
        self._notice: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Called by uvicorn's signal handler: start the notice, or (notice 0, repeated signal) shut down now."""
        if self.notice_s <= 0 or self._notice is not None:
            if self._notice is not None:
                self._notice.cancel()
            super().handle_exit(sig, frame)
            return
        self.engine.refuse_new()
        self._notice = threading.Timer(self.notice_s, super().handle_exit, (sig, frame))
        self._notice.daemon = True
        self._notice.start()


def conversation(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str]], str | None]:
    """(query, history pairs, system) from OpenAI messages: system first, then user/assistant turns, user last."""
    system_parts = []
    index = 0
    while index < len(messages) and messages[index].role == "system":
        system_parts.append(messages[index].content)
        index += 1
    turns = messages[index:]
    for offset, message in enumerate(turns):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message.role != expected:
            raise field_error(("body", "messages", index + offset, "role"),
                              f"expected {expected!r}: after optional system messages, user and assistant "
                              "alternate, starting and ending with user")
    if not turns or len(turns) % 2 == 0:
        raise field_error(("body", "messages"), "the last message must be a user message")
    history = [(turns[i].content, turns[i + 1].content) for i in range(0, len(turns) - 1, 2)]
    return turns[-1].content, history, "\n".join(system_parts) or None


def _usage(done: Finished) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def _incomplete(done: Finished) -> ErrorDetail:
    if done.reason == "timeout":
        return ErrorDetail(message="generation exceeded the request timeout", type="timeout")
    if done.reason == "cancelled":
        return ErrorDetail(message="generation was cancelled (server shutting down)", type="server_unavailable")
    if done.reason == OUT_OF_MEMORY:
        return ErrorDetail(message="the server ran out of device memory for this request; retry later or ask for "
                                   "fewer max_tokens", type="server_unavailable")
    return ErrorDetail(message=f"generation failed: {done.error}", type="server_error")


def _raise_unless_complete(done: Finished) -> Finished:
    if done.reason in ("stop", "length"):
        return done
    detail = _incomplete(done)
    status = {"timeout": 504, "server_unavailable": 503}.get(detail.type, 500)
    raise ApiError(status, detail.message, detail.type)
