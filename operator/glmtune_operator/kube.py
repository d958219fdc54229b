"""The operator's Kubernetes API calls (the `kubernetes` client), idempotent by construction.

`ensure` creates a child or adopts the existing one of the same name (replaying a handler creates nothing
twice), `apply` creates or merge-patches it, `patch_status` writes the GLMFineTune status with a
resourceVersion precondition so two writers never overwrite each other (a stale writer gets `Stale`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

from glmtune_operator import names

MERGE_PATCH = "application/merge-patch+json"
Manifest = dict[str, Any]


class Stale(Exception):
    """The object changed since it was read (HTTP 409 Conflict on a precondition)."""


def load_client_config() -> None:
    """In-cluster service account credentials, else the local kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _reason(exc: Exception) -> str:
    try:
        return json.loads(getattr(exc, "body", None) or "{}").get("reason", "")
    except ValueError:
        return ""


class KubeApi:
    """Create/read/patch/delete of the kinds a GLMFineTune owns, returning plain dicts."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        self._client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self._client)
        self.apps = client.AppsV1Api(self._client)
        self.custom = client.CustomObjectsApi(self._client)

    def _plain(self, obj: Any) -> Manifest:
        return obj if isinstance(obj, dict) else self._client.sanitize_for_serialization(obj)

    def _ops(self, manifest: Mapping[str, Any]) -> tuple[Callable, Callable, Callable, Callable]:
        """(create, read, patch, delete) for the manifest's kind, each taking the namespace (+ name)."""
        kind = manifest["kind"]
        if kind == "ConfigMap":
            return (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map,
                    self.core.patch_namespaced_config_map, self.core.delete_namespaced_config_map)
        if kind == "Service":
            return (self.core.create_namespaced_service, self.core.read_namespaced_service,
                    self.core.patch_namespaced_service, self.core.delete_namespaced_service)
        if kind == "Deployment":
            return (self.apps.create_namespaced_deployment, self.apps.read_namespaced_deployment,
                    self.apps.patch_namespaced_deployment, self.apps.delete_namespaced_deployment)
        if kind == "PyTorchJob":
            args = ("kubeflow.org", "v1")
            return (lambda ns, body: self.custom.create_namespaced_custom_object(*args, ns, "pytorchjobs", body),
                    lambda name, ns: self.custom.get_namespaced_custom_object(*args, ns, "pytorchjobs", name),
                    lambda name, ns, body, **kw: self.custom.patch_namespaced_custom_object(
                        *args, ns, "pytorchjobs", name, body, **kw),
                    lambda name, ns: self.custom.delete_namespaced_custom_object(*args, ns, "pytorchjobs", name))
        raise ValueError(f"the operator does not manage {kind} objects")

    def ensure(self, manifest: Manifest) -> tuple[Manifest, bool]:
        """Create the object, or return the existing one of that name; (object, created)."""
        from kubernetes.client.exceptions import ApiException

        create, read, _, _ = self._ops(manifest)
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            return self._plain(create(namespace, manifest)), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        return self._plain(read(name, namespace)), False

    def apply(self, manifest: Manifest) -> Manifest:
        """Create the object, or merge-patch the existing one to the manifest's labels and spec."""
        from kubernetes.client.exceptions import ApiException

        create, _, patch, _ = self._ops(manifest)
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            return self._plain(create(namespace, manifest))
        except ApiException as exc:
            if exc.status != 409:
                raise
        change = {"metadata": {"labels": manifest["metadata"].get("labels", {})}, "spec": manifest["spec"]}
        return self._plain(patch(name, namespace, change, _content_type=MERGE_PATCH))

    def delete(self, manifest: Mapping[str, Any]) -> bool:
        """Delete the object named by the manifest; False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        *_, delete = self._ops(manifest)
        try:
            delete(manifest["metadata"]["name"], manifest["metadata"]["namespace"])
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def patch_job(self, namespace: str, name: str, change: Manifest) -> bool:
        """Merge-patch a PyTorchJob (e.g. runPolicy.suspend); False when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name, change)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_pods(self, namespace: str, selector: Mapping[str, str]) -> list[Manifest]:
        """The pods of `namespace` whose labels match `selector` (for reaching canary pods directly)."""
        text = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        return list(self._plain(self.core.list_namespaced_pod(namespace, label_selector=text)).get("items") or [])

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's decoded data, None when it does not exist (the operator may only `get` Secrets)."""
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._plain(self.core.read_namespaced_secret(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str) -> Manifest:
        """Merge `status` into the GLMFineTune's status if it is still at `resource_version`, else raise Stale."""
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"resourceVersion": resource_version}, "status": dict(status)}
        try:
            return self.custom.patch_namespaced_custom_object_status(
                names.GROUP, names.VERSION, namespace, names.PLURAL, name, body)
        except ApiException as exc:
            if exc.status == 409 and _reason(exc) == "Conflict":
                raise Stale(f"{namespace}/{name} changed since resourceVersion {resource_version}") from None
            raise
