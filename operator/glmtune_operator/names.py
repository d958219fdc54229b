"""Deterministic names and labels of the objects a GLMFineTune owns (the same input always gives the same name).

Kubeflow names a job's pods and services `<job>-master-0` / `<job>-worker-<i>`, and Services must be
DNS-1035 labels (start with a letter, at most 63 characters), so job names leave room for that suffix.
"""

from __future__ import annotations

import hashlib

from glmtune.spec import API_GROUP

GROUP = API_GROUP
VERSION = "v1alpha1"
PLURAL = "glmfinetunes"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = f"{GROUP}/run"
LABEL_TRACK = f"{GROUP}/track"
"""On canary pods only (value `canary`): the Service selects them with the stable ones, the operator alone."""
TRACK_CANARY = "canary"
MANAGED_BY = "glmtune-operator"

_JOB_NAME_MAX = 63 - len("-worker-1023")
_NAME_MAX = 63


def _fit(base: str, suffix: str, limit: int) -> str:
    """`base + suffix`, starting with a letter; a too-long base is cut and made unique with a hash."""
    if not base[:1].isalpha():
        base = f"ft-{base}"
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def job_name(resource_name: str, run: int) -> str:
    """The PyTorchJob of run `run` (e.g. `chat-run-3`)."""
    return _fit(resource_name, f"-run-{run}", _JOB_NAME_MAX)


def config_map_name(resource_name: str, run: int) -> str:
    """The ConfigMap holding run `run`'s trainer spec."""
    return job_name(resource_name, run) + "-spec"


def server_name(resource_name: str) -> str:
    """The inference Deployment and its Service."""
    return _fit(resource_name, "-server", _NAME_MAX)


def canary_name(resource_name: str) -> str:
    """The canary Deployment of a new model under `serving.promotion` (behind the same Service)."""
    return _fit(resource_name, "-canary", _NAME_MAX)


def canary_selector(resource_name: str) -> dict[str, str]:
    """Labels that select the canary pods only."""
    return {**selector_labels(resource_name, "server"), LABEL_TRACK: TRACK_CANARY}


def selector_labels(resource_name: str, component: str) -> dict[str, str]:
    """Labels that select one component of one GLMFineTune (immutable Deployment selectors use them)."""
    return {LABEL_NAME: "glmtune", LABEL_INSTANCE: resource_name, LABEL_COMPONENT: component}


def labels(resource_name: str, component: str, run: int | None = None,
           extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every label of a child: the user's labels, the app.kubernetes.io set and the run number."""
    result = dict(extra or {})
    result.update(selector_labels(resource_name, component))
    result.update({LABEL_PART_OF: "glmtune", LABEL_MANAGED_BY: MANAGED_BY})
    if run is not None:
        result[LABEL_RUN] = str(run)
    return result
