"""The HTTP server: the app (`create_app`) over a serving engine, and uvicorn with a drain notice.

Routes: the OpenAI API (`routes_openai`: chat completions with ChatGLM3 tools, completions, models), the seed
project's `POST /` and `/healthz`, `/readyz`, `/metrics` (`routes_ops`), and the chat page (`webui`: `GET /`,
`GET /report`). State lives on `app.state` (`app_state.ServerState`), never in closures or module globals.

Requests only name served models (never paths); a field a client gets wrong answers 400 naming it (`param`) on
/v1 and 422 on the seed's `POST /`; a full queue 429 and a draining server 503, both with Retry-After; a request
whose KV cache could never fit the server's KV budget, or whose forward ran out of device memory, 503.
`DrainingServer` gives a terminating pod a drain notice: for a few seconds after SIGTERM it still listens but
takes no new work (503 + Retry-After, /readyz 503), so the Service drops it and clients retry elsewhere instead of
meeting a refused connection; then uvicorn's graceful shutdown lets open requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from glmtune_inference import routes_openai, routes_ops, webui
from glmtune_inference.access_log import AccessLogMiddleware
from glmtune_inference.app_state import ApiError, ServerState, api_error, validation_error
from glmtune_inference.metrics import ServerMetrics
from glmtune_inference.scheduler import ServingEngine


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of one server (CLI flags set them); `report_path` is the training report GET /report
    serves."""

    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 2048
    default_max_tokens: int = 512
    request_timeout_s: float = 300.0
    api_key: str | None = None
    log_prompts: bool = False
    retry_after_s: int = 1
    ready_cache_s: float = 5.0
    drain_timeout_s: float = 30.0
    report_path: Path | None = None


def create_app(engine: ServingEngine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The FastAPI app over `engine`; starts the engine on startup and drains it on shutdown."""
    metrics = ServerMetrics()
    metrics.track_engine(lambda: engine.queue_depth, lambda: engine.running)
    metrics.track_memory(engine)
    engine.step_observer = metrics.batch_size.observe
    engine.finish_observer = metrics.observe_finished

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, settings.drain_timeout_s)

    app = FastAPI(title="glmtune inference", version="1", lifespan=lifespan)
    app.state.server = ServerState(engine=engine, settings=settings, metrics=metrics)
    app.state.settings = settings  # the chat page (webui) reads it
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(routes_openai.router)
    app.include_router(routes_ops.router)
    app.include_router(webui.router)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain notice of `notice_s` seconds between SIGTERM/SIGINT and its own shutdown, during
    which the engine refuses new requests (503) and finishes the ones it has; a second signal skips the notice."""

    def __init__(self, config: uvicorn.Config, engine: ServingEngine, notice_s: float = 0.0) -> None:
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
