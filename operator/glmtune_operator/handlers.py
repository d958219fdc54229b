"""The kopf handlers: thin wrappers that call one `reconcile` function each (`kopf run -m glmtune_operator.handlers`).

Children are watched through in-memory indexes (PyTorchJobs, inference Deployments), so the progress timer
reads no API objects (except the canary pods while a `serving.promotion` canary runs); status is written with
resourceVersion preconditions by `reconcile.write`.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from glmtune_operator import kube, metrics, names, phases, reconcile, rollout
from glmtune_operator.settings import load_settings

RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)
CHILD_LABELS = {names.LABEL_MANAGED_BY: names.MANAGED_BY}
_SETTINGS = load_settings()  # decorators below need the timer interval at import time


def _memory(memo: kopf.Memo) -> reconcile.Memory:
    """This resource's own memory (kopf gives each object its own copy of the memo)."""
    if "memory" not in memo:
        memo["memory"] = reconcile.Memory()
    return memo["memory"]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Client config, kopf storage and posting settings, shared state, the metrics endpoint."""
    kube.load_client_config()
    # kopf's bookkeeping goes to annotations, leaving `status` to the operator's own fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our transitions post their own Events; keep kopf's chatter out
    settings.execution.max_workers = 32
    settings.networking.request_timeout = 60
    memo["operator"] = reconcile.Operator(kube.KubeApi(), _SETTINGS)
    if _SETTINGS.metrics_bind:
        metrics.serve(_SETTINGS.metrics_bind)


@kopf.index("kubeflow.org", "v1", "pytorchjobs", labels=CHILD_LABELS)
def training_jobs(namespace: str, name: str, status: kopf.Status, **_: Any) -> dict:
    """(namespace, job name) → (state, message) of every PyTorchJob the operator created."""
    return {(namespace, name): phases.job_state(status)}


@kopf.index("apps", "v1", "deployments", labels=CHILD_LABELS)
def inference_deployments(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    """(namespace, deployment name) → rollout view of every inference Deployment the operator created."""
    return {(namespace, name): rollout.deployment_view(body)}


@kopf.on.create(*RESOURCE, backoff=2)
def on_create(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A new GLMFineTune: run 1."""
    with metrics.timed("create"):
        reconcile.reconcile_spec(memo["operator"], body, _memory(memo), "created")


@kopf.on.resume(*RESOURCE, backoff=2)
def on_resume(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Operator (re)start: adopt the children of runs in flight; nothing is created twice."""
    with metrics.timed("resume"):
        reconcile.reconcile_spec(memo["operator"], body, _memory(memo), "operator resumed")


@kopf.on.update(*RESOURCE, field="spec", backoff=2)
def on_update(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Spec changed: a new run for training fields, a Deployment patch for serving fields."""
    with metrics.timed("update"):
        reconcile.reconcile_spec(memo["operator"], body, _memory(memo), "spec changed")


@kopf.timer(*RESOURCE, interval=_SETTINGS.progress_interval_seconds, backoff=5)
def on_progress(body: kopf.Body, memo: kopf.Memo, training_jobs: kopf.Index,
                inference_deployments: kopf.Index, **_: Any) -> None:
    """Job state → phase, export check, rollout health and rollback, S3 data drops."""
    with metrics.timed("progress"):
        reconcile.advance(memo["operator"], body, _memory(memo), training_jobs, inference_deployments)
