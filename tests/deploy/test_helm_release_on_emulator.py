"""`helm template` output applied to a Kubernetes API (the emulator on 127.0.0.1) as a user would apply it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from testkit import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "operator"))  # the emulator lives with the operator tests

from kube_runtime import EmulatedCluster  # noqa: E402

CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
CHART = REPO_ROOT / "charts" / "glmtune"
RELEASE_NAMESPACE = "glmtune-system"


@pytest.fixture
def cluster() -> Iterator[EmulatedCluster]:
    running = EmulatedCluster().start()
    yield running
    running.stop()


def _release_objects(helm: Callable[..., subprocess.CompletedProcess[str]]) -> list[dict[str, Any]]:
    result = helm("template", "glmtune", str(CHART), "--namespace", RELEASE_NAMESPACE, "--include-crds")
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_rendered_release_applies_and_serves_glmfinetunes(
    helm: Callable[..., subprocess.CompletedProcess[str]], cluster: EmulatedCluster, tmp_path: Path
) -> None:
    from kubernetes import client, config, utils

    objects = _release_objects(helm)
    kinds = sorted({obj["kind"] for obj in objects})
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= set(
        kinds
    ), kinds

    api = config.new_client_from_config(str(cluster.write_kubeconfig(tmp_path / "kubeconfig")))
    client.CoreV1Api(api).create_namespace({"metadata": {"name": RELEASE_NAMESPACE}})
    for obj in objects:
        if obj["kind"] == "CustomResourceDefinition":
            # The emulator establishes a CRD (serves its resource) the way the API server does after apply.
            cluster.call(lambda emulator, crd=obj: emulator.register_crd(crd))
        else:
            utils.create_from_dict(api, obj, namespace=RELEASE_NAMESPACE)

    deployments = client.AppsV1Api(api).list_namespaced_deployment(RELEASE_NAMESPACE).items
    operator = next(d for d in deployments if d.metadata.name.startswith("glmtune"))
    container = operator.spec.template.spec.containers[0]
    assert container.command == ["glmtune", "operator"]
    assert operator.spec.strategy.type == "Recreate"
    assert operator.spec.template.spec.service_account_name in {
        sa.metadata.name for sa in client.CoreV1Api(api).list_namespaced_service_account(RELEASE_NAMESPACE).items
    }
    assert [crd["metadata"]["name"] for crd in cluster.live(CRD_RESOURCE)] == ["glmfinetunes.glmtune.io"]

    example = yaml.safe_load((REPO_ROOT / "manifests" / "examples" / "lora.yaml").read_text())
    namespace = example["metadata"].get("namespace", "default")
    if namespace != RELEASE_NAMESPACE:  # the emulator starts with no namespaces, not even `default`
        client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object("glmtune.io", "v1alpha1", namespace, "glmfinetunes", example)
    listed = custom.list_namespaced_custom_object("glmtune.io", "v1alpha1", namespace, "glmfinetunes")["items"]
    assert [item["metadata"]["name"] for item in listed] == [example["metadata"]["name"]]
