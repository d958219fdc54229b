"""What every route shares: the server's state on `app.state` (engine, settings, served models, metrics), its
errors (OpenAI-style bodies) and the checks each request goes through (API key, model name, queue).

Routes are module-level functions on `APIRouter`s; they read this state through `state(request)`, so one
process may hold several apps (tests do) without module globals.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from glmtune.errors import InvalidInputError
from glmtune_inference.api_schema import ErrorDetail, ErrorResponse
from glmtune_inference.generation import GenerationParams
from glmtune_inference.handles import ChoiceGroup
from glmtune_inference.loading import ServedModel
from glmtune_inference.metrics import ServerMetrics
from glmtune_inference.scheduler import EngineUnavailableError, QueueFullError, ServingEngine

if TYPE_CHECKING:
    from glmtune_inference.server import ServerSettings

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503, 504)}
_bearer = HTTPBearer(auto_error=False)


@dataclass
class ServerState:
    """The one server's state, kept on `app.state.server` (`app.state.settings` too: the chat page reads it)."""

    engine: ServingEngine
    settings: ServerSettings
    metrics: ServerMetrics
    ready_at: float = 0.0  # when the last readiness test generation succeeded (monotonic)

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.engine.models


def state(request: Request) -> ServerState:
    """The state of the app serving `request`."""
    return request.app.state.server


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def field_error(loc: Sequence[str | int], message: str) -> RequestValidationError:
    """A request field's error, in FastAPI's validation-error format (answered by `validation_error`)."""
    return RequestValidationError([{"loc": tuple(loc), "msg": message, "type": "value_error"}])


def param_path(loc: Sequence[str | int], body: Any = None) -> str:
    """OpenAI's name of a field: `("body", "messages", 0, "role")` -> `messages[0].role`; pydantic's union member
    tags (`list[constrained-str]`, `NamedToolChoice`) are left out (our field names are snake_case)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    text, node = "", body
    for part in parts:
        tag = isinstance(part, str) and (not isinstance(node, dict | None) or _TAG.search(part) is not None)
        if tag and not (isinstance(node, dict) and part in node):
            continue
        node = node[part] if _holds(node, part) else None
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


_TAG = re.compile(r"[\[\]\-'A-Z]")


def _holds(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


async def api_error(_: Request, exc: ApiError) -> JSONResponse:
    """Exception handler: an `ApiError` as its status and OpenAI-style body."""
    body = ErrorResponse(error=ErrorDetail(message=str(exc), type=exc.kind, param=exc.param))
    return JSONResponse(body.model_dump(), status_code=exc.status, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Exception handler: on the OpenAI routes a 400 whose `param` names the first bad field (what OpenAI's clients
    expect); elsewhere FastAPI's own 422 with every error's location."""
    errors = list(exc.errors())
    if not request.url.path.startswith("/v1/"):
        return JSONResponse({"detail": _plain(errors)}, status_code=422)
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    param = param_path(first.get("loc", ("body",)), exc.body)
    message = "; ".join(f"{param_path(e.get('loc', ('body',)), exc.body)}: {e.get('msg', 'invalid')}"
                        for e in errors[:5])
    body = ErrorResponse(error=ErrorDetail(message=message, type="invalid_request_error", param=param))
    return JSONResponse(body.model_dump(), status_code=400)


def _plain(errors: list[dict]) -> list[dict]:
    """Validation errors with only JSON-safe parts (pydantic may put exception objects in `ctx`)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


async def authorized(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Dependency: the request carries the server's API key (when it has one)."""
    key = state(request).settings.api_key
    if key is None:
        return
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                       headers={"WWW-Authenticate": "Bearer"})


def served_model(request: Request, name: str, param: str = "model") -> ServedModel:
    """The served model a request names (404 naming `param` otherwise: names never reach the file system)."""
    served = state(request).models.get(name)
    if served is None:
        raise ApiError(404, f"model {name!r} is not served here (GET /v1/models lists them)",
                       "invalid_request_error", param=param)
    return served


def check_prompt(request: Request, served: ServedModel, ids: list[int], loc: Sequence[str | int]) -> list[int]:
    """`ids` unless the prompt is longer than the server or the model takes."""
    limit = min(state(request).settings.max_prompt_tokens, served.context_length - 1)
    if len(ids) > limit:
        raise field_error(loc, f"the prompt is {len(ids)} tokens; this server takes at most {limit}")
    return ids


def make_params(served: ServedModel, **kwargs) -> GenerationParams:
    """Generation parameters for `served`; a value it refuses becomes an error naming the field."""
    try:
        return served.params(**kwargs)
    except InvalidInputError as exc:
        raise field_error(("body", exc.where or "body"), str(exc)) from None


def submit(request: Request, model: str, choices: list[tuple[list[int], GenerationParams]]) -> ChoiceGroup:
    """Queue a request's choices: 429 when the queue is full, 503 while the server starts or drains."""
    server = state(request)
    retry = {"Retry-After": str(server.settings.retry_after_s)}
    try:
        return server.engine.submit_choices(model, choices, timeout_s=server.settings.request_timeout_s)
    except QueueFullError as exc:
        raise ApiError(429, f"server busy: {exc}", "rate_limit_error", headers=retry) from None
    except EngineUnavailableError as exc:
        raise ApiError(503, str(exc), "server_unavailable", headers=retry) from None
