"""Helpers of the operator tests (import as `operator_testkit`): waiting, objects, S3 exports."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml
from kube_runtime import EmulatedCluster
from testkit import shared_dir

NAMESPACE = "ml"
KUBEFLOW_CRD = ("reference", "kubeflow", "kubeflow.org_pytorchjobs.yaml")
FT = "glmtune.io/v1alpha1/glmfinetunes"
JOBS = "kubeflow.org/v1/pytorchjobs"


def wait_for(check: Callable[[], Any], timeout: float, what: str, on_timeout: Callable[[], str] = str) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` (and extra diagnostics) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")
        time.sleep(0.1)


def kubeflow_crd() -> dict[str, Any]:
    path = shared_dir().joinpath(*KUBEFLOW_CRD)
    if not path.exists():
        pytest.skip(f"the Kubeflow PyTorchJob CRD {path} is absent (set GLMTUNE_SHARED)")
    return yaml.safe_load(path.read_text())


def finetune(name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A GLMFineTune object in namespace `ml`."""
    meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "metadata": meta, "spec": spec}


def get_ft(cluster: EmulatedCluster, name: str) -> dict[str, Any] | None:
    return next((o for o in cluster.live(FT, NAMESPACE) if o["metadata"]["name"] == name), None)


def phase_of(cluster: EmulatedCluster, name: str) -> str | None:
    ft = get_ft(cluster, name)
    return ((ft or {}).get("status") or {}).get("phase")


def upload_export(s3: Any, uri: str, files: dict[str, bytes]) -> str:
    """Put an export under `uri` the way the trainer does: files first, glmtune-manifest.json last."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    manifest = {"format": "glmtune-manifest/v1", "files": {}}
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    raw = json.dumps(manifest).encode()
    s3.put_object(Bucket=bucket, Key=f"{prefix}/glmtune-manifest.json", Body=raw)
    return hashlib.sha256(raw).hexdigest()


def api_request(cluster: EmulatedCluster, method: str, path: str, body: Any = None,
                content_type: str = "application/merge-patch+json") -> dict[str, Any]:
    """One HTTP call to the API server, as kubectl would make it; fails the test on an error status."""
    response = httpx.request(method, cluster.url + path, json=body, headers={"Content-Type": content_type},
                             timeout=10)
    assert response.status_code < 300, response.text
    return response.json()


def patch_spec(cluster: EmulatedCluster, name: str, spec_patch: dict[str, Any]) -> dict[str, Any]:
    """`kubectl patch glmft NAME --type merge -p '{"spec": ...}'`."""
    return api_request(cluster, "PATCH", f"/apis/glmtune.io/v1alpha1/namespaces/{NAMESPACE}/glmfinetunes/{name}",
                       {"spec": spec_patch})


def operator_calls(cluster: EmulatedCluster) -> set[tuple[str, str, str]]:
    """(api group, resource[/subresource], verb) of every request the operator (kopf + kubernetes client) made."""
    calls = cluster.call(lambda e: list(e.call_log))
    return {(c.group, c.resource, c.verb) for c in calls if c.agent.startswith(("kopf/", "OpenAPI-Generator"))}


def chart_grants() -> set[tuple[str, str, str]]:
    """(api group, resource, verb) granted by the ClusterRoles in manifests/operator.yaml (rendered chart)."""
    from testkit import REPO_ROOT

    path = REPO_ROOT / "manifests" / "operator.yaml"
    if not path.exists():
        pytest.skip(f"{path} is absent (scripts/render_manifests.sh renders it)")
    grants = set()
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") in ("ClusterRole", "Role"):
            for rule in doc.get("rules", []):
                grants |= {(group, res, verb) for group in rule["apiGroups"] for res in rule["resources"]
                           for verb in rule["verbs"]}
    return grants


def assert_chart_rbac_covers_operator(cluster: EmulatedCluster) -> None:
    """Every request the operator made is allowed by the Helm chart's RBAC rules (least privilege holds)."""
    missing = sorted(operator_calls(cluster) - chart_grants())
    assert missing == [], f"the chart's RBAC does not grant: {missing}"
