"""Health-gated rollout of the inference Deployment, as pure decisions over the Deployment's observed state.

The operator sets the new model URI on the Deployment (rolling update, maxUnavailable 0, so the old pods
keep serving until new ones are Ready). The rollout is done when every pod runs the new template and is
available; it failed when the Deployment controller reports ProgressDeadlineExceeded or the GLMFineTune's
`serving.readyDeadlineSeconds` passed — then the operator sets the previous URI back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from glmtune_operator.builders import MODEL_URI_ENV, SERVER_CONTAINER

DONE, WAITING, FAILED = "done", "waiting", "failed"


@dataclass(frozen=True)
class DeploymentView:
    """What the rollout decision needs from a Deployment (kept in the operator's in-memory index)."""

    model_uri: str | None
    generation: int
    observed_generation: int
    replicas: int
    current_replicas: int
    updated_replicas: int
    available_replicas: int
    deadline_exceeded: bool


def deployment_view(body: Mapping[str, Any]) -> DeploymentView:
    """Digest a Deployment object (spec, status) into a `DeploymentView`."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    containers = (((spec.get("template") or {}).get("spec") or {}).get("containers")) or []
    server = next((c for c in containers if c.get("name") == SERVER_CONTAINER), {})
    uri = next((e.get("value") for e in server.get("env") or [] if e.get("name") == MODEL_URI_ENV), None)
    progressing = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
    return DeploymentView(
        model_uri=uri,
        generation=int((body.get("metadata") or {}).get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        replicas=int(spec.get("replicas", 1)),
        current_replicas=int(status.get("replicas") or 0),
        updated_replicas=int(status.get("updatedReplicas") or 0),
        available_replicas=int(status.get("availableReplicas") or 0),
        deadline_exceeded=progressing.get("status") == "False"
        and progressing.get("reason") == "ProgressDeadlineExceeded",
    )


def is_complete(view: DeploymentView) -> bool:
    """`kubectl rollout status` done: the controller saw the template, every pod is new and available."""
    return (view.observed_generation >= view.generation
            and view.updated_replicas >= view.replicas
            and view.current_replicas == view.updated_replicas
            and view.available_replicas >= view.replicas)


def verdict(view: DeploymentView | None, candidate: str, started: datetime, deadline_seconds: float,
            now: datetime) -> tuple[str, str]:
    """(done|waiting|failed, why) for a rollout of `candidate` (the pods' local form of the URI)."""
    on_candidate = view is not None and view.model_uri == candidate
    if on_candidate and is_complete(view):
        return DONE, ""
    if on_candidate and view.deadline_exceeded:
        return FAILED, "the Deployment controller reports ProgressDeadlineExceeded"
    waited = (now - started).total_seconds()
    if waited > deadline_seconds:
        ready = f"{view.available_replicas}/{view.replicas}" if on_candidate else "0"
        return FAILED, f"{ready} new pods ready after {waited:.0f}s (serving.readyDeadlineSeconds={deadline_seconds:g})"
    return WAITING, ""
