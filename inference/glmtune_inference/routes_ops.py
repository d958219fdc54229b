"""The routes beside the OpenAI API: the seed project's `POST /` (prompt + history), and `/healthz`, `/readyz`,
`/metrics` for Kubernetes and Prometheus.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from glmtune_inference.api_schema import ErrorResponse, SeedRequest, SeedResponse
from glmtune_inference.app_state import (
    ERROR_RESPONSES,
    ApiError,
    authorized,
    check_prompt,
    field_error,
    make_params,
    served_model,
    state,
    submit,
)
from glmtune_inference.handles import Finished
from glmtune_inference.streaming import RequestRun

router = APIRouter()


@router.post("/", response_model=SeedResponse, dependencies=[Depends(authorized)], responses=ERROR_RESPONSES)
async def seed_generate(body: SeedRequest, request: Request) -> SeedResponse:
    """The original ChatGLM API: one answer and the history extended by it."""
    start = time.perf_counter()
    engine = state(request).engine
    name = body.model or engine.default_model
    served = served_model(request, name)
    history = [tuple(pair) for pair in body.history]
    try:
        ids = served.encode(body.prompt, history, None)
    except UnicodeError:
        raise field_error(("body", "prompt"), "text is not valid Unicode") from None
    check_prompt(request, served, ids, ("body", "prompt"))
    if len(ids) >= body.max_length:
        raise field_error(("body", "max_length"), f"must exceed the prompt's {len(ids)} tokens")
    params = make_params(served, max_length=body.max_length, top_p=body.top_p, temperature=body.temperature,
                         do_sample=body.temperature > 0, max_new_tokens=state(request).settings.max_tokens_limit)
    (done,) = await RequestRun(request, submit(request, name, [(ids, params)]), start).collect()
    return SeedResponse(response=done.text, history=[*history, (body.prompt, done.text)], status=200,
                        time=time.strftime("%Y-%m-%d %H:%M:%S"))


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> dict:
    """Readiness: accepting requests, and a one-token test generation succeeded within `ready_cache_s`."""
    server = state(request)
    engine, settings = server.engine, server.settings
    if not engine.accepting:
        raise ApiError(503, "not accepting requests", "server_unavailable",
                       headers={"Retry-After": str(settings.retry_after_s)})
    if time.monotonic() - server.ready_at > settings.ready_cache_s:
        served = engine.models[engine.default_model]
        try:
            group = submit(request, served.name, [(served.encode("你好"),
                                                  served.params(do_sample=False, max_new_tokens=1))])
        except ApiError as exc:
            if exc.status != 429:
                raise
            # Busy (the queue is full) means it is serving: failing readiness now would take a
            # loaded pod out of the Service exactly when it is needed.
            return {"status": "ready", "models": list(engine.models), "busy": True}
        async for _, event in group:
            if isinstance(event, Finished) and event.reason not in ("stop", "length"):
                raise ApiError(503, f"test generation failed ({event.reason})", "server_unavailable")
        server.ready_at = time.monotonic()
    return {"status": "ready", "models": list(engine.models)}


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format."""
    metrics = state(request).metrics
    return Response(metrics.render(), media_type=metrics.content_type)
