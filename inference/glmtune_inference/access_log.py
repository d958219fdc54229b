"""ASGI middleware: one JSON access-log line and the request metrics per HTTP request.

Prompts and answers are never logged unless the server is configured to (`log_prompts`); handlers add
what they know (model, token counts, finish reason) to `request.state.access` for the line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from glmtune_inference.metrics import ServerMetrics

log = logging.getLogger("glmtune.access")

# Metric label values are limited to the routes that exist, so random paths cannot grow the label set.
_KNOWN_PATHS = frozenset({"/", "/v1/chat/completions", "/v1/completions", "/v1/models", "/report", "/healthz",
                          "/readyz", "/metrics"})


class AccessLogMiddleware:
    """Wraps the app; measures until the last body byte, so streamed responses count in full."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        state = scope.setdefault("state", {})
        state["access"] = {}

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            elapsed = time.perf_counter() - start
            path = scope.get("path", "")
            endpoint = path if path in _KNOWN_PATHS else "other"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.request_latency.labels(endpoint).observe(elapsed)
            line = {"ts": round(time.time(), 3), "method": scope.get("method"), "path": path,
                    "status": status["code"], "duration_ms": round(elapsed * 1000, 1),
                    "client": (scope.get("client") or ("", 0))[0], **state.get("access", {})}
            log.info(json.dumps(line, ensure_ascii=False))


def configure_access_log() -> None:
    """JSON access lines go to stderr as they are (one object per line)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
