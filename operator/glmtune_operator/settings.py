"""Operator settings from the environment (the Helm chart sets them on the operator Deployment)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from glmtune import __version__
from glmtune.errors import InvalidInputError

DEFAULT_TRAINER_IMAGE = f"ghcr.io/glmtune/glmtune-train:{__version__}"
DEFAULT_SERVER_IMAGE = f"ghcr.io/glmtune/glmtune-serve:{__version__}"


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator needs besides each GLMFineTune: default images, S3 endpoint, timings, endpoints."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    server_image: str = DEFAULT_SERVER_IMAGE
    watch_namespaces: tuple[str, ...] = ()
    """Namespaces to serve; empty: all of them."""
    s3_endpoint: str | None = None
    """Endpoint for s3:// URIs of resources that name none in `spec.s3.endpoint`."""
    rollout_deadline_seconds: int = 900
    """`progressDeadlineSeconds` of inference Deployments (the Deployment controller's own deadline)."""
    metrics_bind: str | None = "0.0.0.0:9090"
    """host:port of the Prometheus endpoint (/metrics); None disables it."""
    progress_interval_seconds: float = 5.0
    """How often each resource's progress (job state, S3 export, rollout health) is checked."""
    data_debounce_seconds: float = 30.0
    """A data drop starts a run only after the S3 listing stayed unchanged this long (uploads finish)."""
    export_grace_seconds: float = 300.0
    """How long after a job succeeded the export manifest may still be missing before the run fails."""
    history_limit: int = 10
    """Runs kept in `status.history`."""


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInputError(f"expected a number, got {raw!r}", where=f"${name}") from None
    if value < minimum:
        raise InvalidInputError(f"must be at least {minimum:g}, got {raw}", where=f"${name}")
    return value


def _bind(env: Mapping[str, str]) -> str | None:
    raw = env.get("GLMTUNE_METRICS_BIND", "0.0.0.0:9090").strip()
    if raw in ("", "off", "none"):
        return None
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"expected host:port (e.g. 0.0.0.0:9090) or 'off', got {raw!r}",
                                where="$GLMTUNE_METRICS_BIND")
    return raw


def load_settings(env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Read GLMTUNE_* variables; a malformed value raises InvalidInputError naming the variable."""
    env = os.environ if env is None else env
    namespaces = tuple(ns.strip() for ns in env.get("GLMTUNE_WATCH_NAMESPACE", "").split(",") if ns.strip())
    return OperatorSettings(
        trainer_image=env.get("GLMTUNE_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE,
        server_image=env.get("GLMTUNE_SERVER_IMAGE", "").strip() or DEFAULT_SERVER_IMAGE,
        watch_namespaces=namespaces,
        s3_endpoint=env.get("GLMTUNE_S3_ENDPOINT", "").strip() or None,
        rollout_deadline_seconds=int(_number(env, "GLMTUNE_ROLLOUT_DEADLINE_SECONDS", 900, 10)),
        metrics_bind=_bind(env),
        progress_interval_seconds=_number(env, "GLMTUNE_PROGRESS_INTERVAL_SECONDS", 5.0, 0.1),
        data_debounce_seconds=_number(env, "GLMTUNE_DATA_DEBOUNCE_SECONDS", 30.0, 0.0),
        export_grace_seconds=_number(env, "GLMTUNE_EXPORT_GRACE_SECONDS", 300.0, 0.0),
        history_limit=int(_number(env, "GLMTUNE_HISTORY_LIMIT", 10, 1)),
    )
