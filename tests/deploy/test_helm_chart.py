"""The Helm chart: lints strictly, renders valid Kubernetes objects, and keeps the operator's contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from glmtune_app.cli import build_parser
from glmtune_operator.cli import kopf_arguments
from glmtune_operator.settings import load_settings
from testkit import REPO_ROOT

from glmtune.crd import build_crd

CHART = REPO_ROOT / "charts" / "glmtune"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
NAMESPACED_VALUES = CHART / "ci" / "namespaced-values.yaml"
KUBERNETES_VERSION = "1.33.0"
BUILTIN_GROUPS = {"", "apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io", "policy", "batch"}
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]

# What the operator may do in a watched namespace, as (apiGroup, resource, verb).
CHILD_VERBS = ("get", "list", "watch", "create", "patch", "update", "delete")
WORKLOAD_PERMISSIONS = (
    {("glmtune.io", "glmfinetunes", verb) for verb in ("get", "list", "watch", "patch", "update")}
    | {("glmtune.io", "glmfinetunes/status", verb) for verb in ("get", "patch", "update")}
    | {("kubeflow.org", "pytorchjobs", verb) for verb in CHILD_VERBS}
    | {("apps", "deployments", verb) for verb in CHILD_VERBS}
    | {("", resource, verb) for resource in ("services", "configmaps") for verb in CHILD_VERBS}
    | {("", "events", "create"), ("", "events", "patch"), ("", "secrets", "get")}
    | {("", "pods", "list")}  # serving.promotion: the operator talks to canary pods directly
)
DISCOVERY_PERMISSIONS = {
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


def _of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def _operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _of_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container["env"]}


def _permissions(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict_passes(helm, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["--values", str(values)] if values else [])
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_every_rendered_builtin_object_validates_against_kubernetes(render, values: Path | None) -> None:
    objects = render([values] if values else [])
    builtin = [obj for obj in objects if obj["apiVersion"].rpartition("/")[0] in BUILTIN_GROUPS]
    assert {"ServiceAccount", "ClusterRole", "Service", "Deployment"} <= {obj["kind"] for obj in builtin}
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_operator_runs_as_one_replica_replaced_by_recreate_with_a_liveness_probe(render) -> None:
    objects = render()
    (deployment,) = _of_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = _operator_container(objects)
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    probe = container["livenessProbe"]["httpGet"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert ports["metrics"] == 9090


def test_operator_gets_its_images_namespaces_and_deadline_from_values(render) -> None:
    container = _operator_container(render())
    assert container["command"] == ["glmtune", "operator"]
    assert container["args"][:2] == ["--standalone", "--all-namespaces"]
    assert _env(container) == {
        "GLMTUNE_TRAINER_IMAGE": f"ghcr.io/glmtune/glmtune-train:{APP_VERSION}",
        "GLMTUNE_SERVER_IMAGE": f"ghcr.io/glmtune/glmtune-serve:{APP_VERSION}",
        "GLMTUNE_WATCH_NAMESPACE": "",
        "GLMTUNE_ROLLOUT_DEADLINE_SECONDS": "900",
        "GLMTUNE_METRICS_BIND": "0.0.0.0:9090",
    }
    assert container["image"] == f"ghcr.io/glmtune/glmtune-operator:{APP_VERSION}"

    custom = _operator_container(
        render(sets=["trainerImage.tag=v7", "s3.endpoint=http://minio:9000", "rolloutDeadlineSeconds=60"])
    )
    env = _env(custom)
    assert env["GLMTUNE_TRAINER_IMAGE"] == "ghcr.io/glmtune/glmtune-train:v7"
    assert env["GLMTUNE_S3_ENDPOINT"] == "http://minio:9000"
    assert env["GLMTUNE_ROLLOUT_DEADLINE_SECONDS"] == "60"


@pytest.mark.parametrize("values", [None, NAMESPACED_VALUES], ids=["defaults", "namespaced"])
def test_operator_command_line_is_one_glmtune_operator_accepts(render, values: Path | None) -> None:
    container = _operator_container(render([values] if values else []))
    command, subcommand = container["command"]
    assert command == "glmtune"
    args = build_parser().parse_args([subcommand, *container["args"]])
    kopf_argv = kopf_arguments(args, load_settings(_env(container)).watch_namespaces)
    # What kopf finally gets: the chart's scope, standalone mode and the probed liveness endpoint.
    assert set(container["args"]) <= set(kopf_argv)


def test_operator_settings_read_from_the_rendered_env_are_the_values(render) -> None:
    container = _operator_container(render([NAMESPACED_VALUES]))
    values = yaml.safe_load(NAMESPACED_VALUES.read_text())
    settings = load_settings(_env(container))
    assert settings.watch_namespaces == tuple(values["watchNamespaces"])
    assert settings.s3_endpoint == values["s3"]["endpoint"]
    assert settings.trainer_image == f"ghcr.io/glmtune/glmtune-train:{APP_VERSION}"
    assert settings.rollout_deadline_seconds == 900
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert settings.metrics_bind == f"0.0.0.0:{ports['metrics']}"


def test_watching_all_namespaces_grants_a_cluster_role(render) -> None:
    objects = render()
    assert not _of_kind(objects, "Role") and not _of_kind(objects, "RoleBinding")
    roles = {role["metadata"]["name"]: _permissions(role) for role in _of_kind(objects, "ClusterRole")}
    assert roles == {"glmtune": WORKLOAD_PERMISSIONS, "glmtune-discovery": DISCOVERY_PERMISSIONS}
    bindings = {b["roleRef"]["name"]: b["subjects"] for b in _of_kind(objects, "ClusterRoleBinding")}
    subject = {"kind": "ServiceAccount", "name": "glmtune", "namespace": "glmtune-system"}
    assert bindings == {"glmtune": [subject], "glmtune-discovery": [subject]}


def test_watching_listed_namespaces_grants_a_role_in_each_and_nothing_cluster_wide(render) -> None:
    objects = render([NAMESPACED_VALUES])
    watched = yaml.safe_load(NAMESPACED_VALUES.read_text())["watchNamespaces"]
    roles = {role["metadata"]["namespace"]: _permissions(role) for role in _of_kind(objects, "Role")}
    assert roles == {namespace: WORKLOAD_PERMISSIONS for namespace in watched}
    assert sorted(b["metadata"]["namespace"] for b in _of_kind(objects, "RoleBinding")) == sorted(watched)
    # Only kopf's cluster-scoped discovery stays cluster-wide.
    assert [_permissions(role) for role in _of_kind(objects, "ClusterRole")] == [DISCOVERY_PERMISSIONS]
    container = _operator_container(objects)
    assert [arg for arg in container["args"] if arg.startswith("--namespace")] == [
        f"--namespace={namespace}" for namespace in watched
    ]
    assert "--all-namespaces" not in container["args"]
    assert _env(container)["GLMTUNE_WATCH_NAMESPACE"] == ",".join(watched)


def test_rbac_names_the_group_and_plural_of_the_generated_crd(render) -> None:
    crd = build_crd()["spec"]
    (role,) = [role for role in _of_kind(render(), "ClusterRole") if role["metadata"]["name"] == "glmtune"]
    own = {(group, resource) for group, resource, _ in _permissions(role) if group == crd["group"]}
    assert own == {(crd["group"], crd["names"]["plural"]), (crd["group"], crd["names"]["plural"] + "/status")}


def test_rbac_can_be_left_to_the_cluster_admin(render) -> None:
    objects = render(sets=["rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops"])
    kinds = {obj["kind"] for obj in objects}
    assert kinds.isdisjoint({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
    (deployment,) = _of_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_operator_pod_meets_the_restricted_pod_security_standard(render) -> None:
    (deployment,) = _of_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = pod["containers"][0]["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["readOnlyRootFilesystem"] is True


def test_service_monitor_is_optional_and_scrapes_the_metrics_service(render) -> None:
    assert not _of_kind(render(), "ServiceMonitor")
    objects = render([NAMESPACED_VALUES])
    (monitor,) = _of_kind(objects, "ServiceMonitor")
    (service,) = _of_kind(objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (deployment,) = _of_kind(objects, "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operator.imagee.tag=1", "additional properties 'imagee' not allowed"),
        ("watchNamespaces[0]=Team_A", "does not match pattern"),
        ("operator.logLevel=loud", "value must be one of"),
        ("trainerImage.tag=2", "got number, want string"),
    ],
)
def test_values_schema_rejects_mistakes_before_anything_renders(helm, setting: str, complaint: str) -> None:
    result = helm("template", "glmtune", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_install_notes_say_how_to_follow_a_fine_tune(helm) -> None:
    result = helm("install", "glmtune", str(CHART), "--namespace", "ml-ops", "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "namespace ml-ops" in notes
    assert "kubectl get glmft" in notes
    assert "deployment/glmtune" in notes
