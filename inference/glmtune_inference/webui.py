"""The browser side of the server: `GET /` is a chat page over the OpenAI API (streamed SSE), `GET /report` the
training report of the served model, `GET /ui/...` the page's own assets and settings.

Everything the page needs ships inside this package (no CDN, no build step), so it works offline. The routes
read the server's settings from `request.app.state.settings` (a `ServerSettings`): `api_key` tells the page to
ask for a key, `report_path` names the served model's report.html.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from glmtune_inference.app_state import ApiError, authorized

STATIC_DIR = Path(__file__).with_name("static")
# The assets the page loads; a fixed table, so no request path ever reaches the file system.
_ASSETS = {"chat.js": "text/javascript", "chat.css": "text/css"}
_NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def _settings(request: Request, name: str) -> object:
    return getattr(request.app.state.settings, name, None)


def _report_path(request: Request) -> Path | None:
    value = _settings(request, "report_path")
    return Path(value) if value else None


@router.get("/", response_class=HTMLResponse)
async def chat_page() -> Response:
    """The chat page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_NO_CACHE)


@router.get("/ui/config")
async def page_config(request: Request) -> dict:
    """What the page must know before its first call: whether to ask for an API key, whether a report exists,
    and the server's max-tokens default and limit (so the form offers what the server accepts)."""
    report = _report_path(request)
    default, limit = _settings(request, "default_max_tokens"), _settings(request, "max_tokens_limit")
    return {"api_key_required": bool(_settings(request, "api_key")),
            "report": report is not None and report.is_file(),
            "default_max_tokens": min(default, limit) if default and limit else default,
            "max_tokens_limit": limit}


@router.get("/ui/{name}")
async def page_asset(name: str) -> Response:
    """One of the page's scripts or stylesheets."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, f"no page asset {name!r}", "invalid_request_error")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_NO_CACHE)


@router.get("/report", response_class=HTMLResponse, dependencies=[Depends(authorized)])
async def training_report(request: Request) -> Response:
    """The served model's training report (report.html, written by the trainer into its export).

    Behind the API key like the API itself: the report names the training data and the export's location."""
    path = _report_path(request)
    if path is None:
        raise ApiError(404, "this server has no training report: serve an export that has report.html (the trainer "
                            "writes it; `glmtune report WORKDIR` rebuilds it)", "invalid_request_error")
    if not path.is_file():
        raise ApiError(404, f"the training report {path} does not exist (rebuild it with `glmtune report WORKDIR`)",
                       "invalid_request_error")
    return FileResponse(path, media_type="text/html", headers=_NO_CACHE)
