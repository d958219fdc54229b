"""The pure manifest builders: what the operator creates, checked without any server.

Every PyTorchJob validates against Kubeflow's real v1 CRD schema (../shared reference); Deployments,
Services and ConfigMaps against the Kubernetes 1.33 schemas (kubernetes-validate).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from glmtune_operator import builders, names
from glmtune_operator.settings import OperatorSettings
from operator_testkit import kubeflow_crd

from glmtune.spec import spec_from_mapping, spec_from_yaml

SETTINGS = OperatorSettings(trainer_image="registry/train:1", server_image="registry/serve:1",
                            s3_endpoint="http://minio.storage:9000", rollout_deadline_seconds=900)
OWNER_UID = "6f1c2d4e-0000-4000-8000-000000000001"


def body(spec: dict[str, Any], name: str = "chat", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune",
            "metadata": {"name": name, "namespace": "ml", "uid": OWNER_UID, "labels": labels or {}}, "spec": spec}


def base_spec(**sections: Any) -> dict[str, Any]:
    spec = {"model": {"uri": "s3://models/base/chatglm3-6b", "family": "v3"},
            "data": {"sources": ["s3://data/alpaca/"]},
            "output": {"uri": "s3://models/finetuned/chat"},
            "s3": {"secretRef": {"name": "s3-creds"}, "region": "eu-west-1"}}
    spec.update(sections)
    return spec


SPECS = {
    "single-cpu": base_spec(),
    "multi-node-gpu": base_spec(
        resources={"nodes": 3, "gpusPerNode": 8, "cpu": "32", "memory": "256Gi", "nodeSelector": {"gpu": "a100"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "priorityClassName": "training", "workdirClaim": "train-shared"},
        training={"deepspeed": {"stage": 3}}, method={"name": "full"},
        runPolicy={"backoffLimit": 5, "activeDeadlineSeconds": 86400, "ttlSecondsAfterFinished": 3600}),
    "multi-node-ddp": base_spec(resources={"nodes": 2, "gpusPerNode": 4}),
    "shared-workdir-and-pvc-uris": base_spec(model={"uri": "pvc://shared/models/chatglm3-6b"},
                                             resources={"nodes": 2, "workdirClaim": "shared"},
                                             training={"deepspeed": {"stage": 2}}),
    "served-with-api-key-and-adapters": base_spec(serving={
        "apiKeySecret": {"name": "chat-api", "key": "token"},
        "adapters": [{"name": "support", "uri": "s3://models/adapters/support"},
                     {"name": "sales", "uri": "pvc://exports/sales/run-3"}]}),
    "pvc-everywhere": base_spec(model={"uri": "pvc://models/base/chatglm2-6b"},
                                data={"sources": ["pvc://datasets/alpaca", "s3://data/extra/"], "cache": "pvc://cache/"},
                                output={"uri": "pvc://models/out/chat"}),
}


def built(spec: dict[str, Any], run: int = 1, labels: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    owner = body(copy.deepcopy(spec), labels=labels)
    return spec_from_mapping(copy.deepcopy(owner)), owner


@pytest.fixture(scope="module")
def pytorchjob_validator() -> jsonschema.Draft4Validator:
    crd = kubeflow_crd()
    return jsonschema.Draft4Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_pytorchjob_validates_against_the_kubeflow_crd(case, pytorchjob_validator):
    ft, owner = built(SPECS[case])
    job = builders.build_pytorchjob(ft, owner, 4, SETTINGS)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in pytorchjob_validator.iter_errors(job)]
    assert errors == []


@pytest.mark.parametrize("case", sorted(SPECS))
def test_deployment_service_and_config_map_validate_as_kubernetes_objects(case):
    ft, owner = built(SPECS[case])
    for manifest in (builders.build_deployment(ft, owner, "s3://models/finetuned/chat/run-2", 2, SETTINGS),
                     builders.build_service(ft, owner), builders.build_config_map(ft, owner, 2)):
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_nodes_become_one_master_and_workers_with_nproc_per_node():
    ft, owner = built(SPECS["multi-node-gpu"])
    spec = builders.build_pytorchjob(ft, owner, 1, SETTINGS)["spec"]
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert spec["nprocPerNode"] == "8"
    single = builders.build_pytorchjob(*built(SPECS["single-cpu"]), 1, SETTINGS)["spec"]
    assert set(single["pytorchReplicaSpecs"]) == {"Master"} and single["nprocPerNode"] == "1"


def test_trainer_pod_runs_torchrun_in_a_container_named_pytorch():
    ft, owner = built(SPECS["multi-node-gpu"])
    for replica in builders.build_pytorchjob(ft, owner, 1, SETTINGS)["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "OnFailure"
        pod = replica["template"]["spec"]
        [container] = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "registry/train:1"
        assert container["command"][:1] == ["torchrun"] and "--nproc_per_node=$(PET_NPROC_PER_NODE)" in container[
            "command"]
        assert container["command"][-3:] == ["-m", "glmtune_trainer", "/etc/glmtune/spec.yaml"]
        assert container["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": 8}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "training"
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in container["ports"]


def test_run_policy_is_passed_to_the_job():
    ft, owner = built(SPECS["multi-node-gpu"])
    policy = builders.build_pytorchjob(ft, owner, 1, SETTINGS)["spec"]["runPolicy"]
    assert policy == {"backoffLimit": 5, "suspend": False, "activeDeadlineSeconds": 86400,
                      "ttlSecondsAfterFinished": 3600}


def test_s3_credentials_come_from_the_secret_never_inline():
    ft, owner = built(SPECS["single-cpu"])
    env = builders.build_pytorchjob(ft, owner, 1, SETTINGS)["spec"]["pytorchReplicaSpecs"]["Master"][
        "template"]["spec"]["containers"][0]["env"]
    by_name = {item["name"]: item for item in env}
    assert by_name["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    assert "value" not in by_name["AWS_SECRET_ACCESS_KEY"]
    assert by_name["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"  # the operator-wide default
    assert by_name["AWS_REGION"]["value"] == "eu-west-1"


def test_config_map_holds_a_loadable_spec_exporting_to_the_run_prefix():
    ft, owner = built(SPECS["single-cpu"])
    config_map = builders.build_config_map(ft, owner, 3)
    assert config_map["metadata"]["name"] == "chat-run-3-spec"
    loaded = spec_from_yaml(config_map["data"]["spec.yaml"], source="configmap")
    assert loaded.spec.output.uri == "s3://models/finetuned/chat/run-3"
    assert loaded.name == "chat" and loaded.spec.model.uri == ft.spec.model.uri


def test_pvc_uris_are_mounted_and_rewritten_to_local_paths():
    ft, owner = built(SPECS["pvc-everywhere"])
    trainer = yaml.safe_load(builders.build_config_map(ft, owner, 2)["data"]["spec.yaml"])["spec"]
    assert trainer["model"]["uri"] == "/mnt/pvc/models/base/chatglm2-6b"
    assert trainer["data"]["sources"] == ["/mnt/pvc/datasets/alpaca", "s3://data/extra/"]
    assert trainer["data"]["cache"] == "/mnt/pvc/cache" and trainer["output"]["uri"] == "/mnt/pvc/models/out/chat/run-2"
    pod = builders.build_pytorchjob(ft, owner, 2, SETTINGS)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert claims == {"models", "datasets", "cache"} and {"/mnt/pvc/models", "/mnt/pvc/datasets"} <= mounts
    server = builders.build_deployment(ft, owner, "pvc://models/out/chat/run-2", 2, SETTINGS)
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "GLMTUNE_MODEL_URI", "value": "/mnt/pvc/models/out/chat/run-2"} in container["env"]
    assert {"name": "pvc-models", "mountPath": "/mnt/pvc/models"} in container["volumeMounts"]


def test_a_created_model_reads_its_tokenizer_from_a_mounted_claim():
    ft, owner = built(base_spec(model={"family": "v2", "create": {"size": "small",
                                                                "tokenizer": "pvc://tokenizers/chatglm2"}}))
    trainer = yaml.safe_load(builders.build_config_map(ft, owner, 1)["data"]["spec.yaml"])["spec"]
    assert trainer["model"]["create"] == {"size": "small", "seed": 0, "tokenizer": "/mnt/pvc/tokenizers/chatglm2"}
    pod = builders.build_pytorchjob(ft, owner, 1, SETTINGS)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {"name": "pvc-tokenizers", "persistentVolumeClaim": {"claimName": "tokenizers"}} in pod["volumes"]
    assert {"name": "pvc-tokenizers", "mountPath": "/mnt/pvc/tokenizers"} in pod["containers"][0]["volumeMounts"]


def _trainer_pods(spec: dict[str, Any], run: int, owner_uid: str = OWNER_UID) -> dict[str, dict[str, Any]]:
    ft, owner = built(spec)
    owner["metadata"]["uid"] = owner_uid
    replicas = builders.build_pytorchjob(ft, owner, run, SETTINGS)["spec"]["pytorchReplicaSpecs"]
    return {role: replica["template"]["spec"] for role, replica in replicas.items()}


def test_work_dir_claim_is_mounted_in_every_pod_with_one_folder_per_run():
    pods = _trainer_pods(SPECS["multi-node-gpu"], 4)
    assert set(pods) == {"Master", "Worker"}
    for pod in pods.values():
        [container] = pod["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["GLMTUNE_WORKDIR"] == "/workspace/shared/chat-6f1c2d4e/run-4"
        assert env["GLMTUNE_CACHE"] == "/workspace/shared/cache"  # node 1 reads the model node 0 downloaded
        assert {"name": "shared-workdir", "persistentVolumeClaim": {"claimName": "train-shared"}} in pod["volumes"]
        assert {"name": "shared-workdir", "mountPath": "/workspace/shared"} in container["volumeMounts"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer"},
                                      "spec": pod}, "1.33.0", strict=True)
    next_run = _trainer_pods(SPECS["multi-node-gpu"], 5)["Worker"]["containers"][0]["env"]
    assert {"name": "GLMTUNE_WORKDIR", "value": "/workspace/shared/chat-6f1c2d4e/run-5"} in next_run
    # A deleted and re-created namesake starts again at run 1: its uid keeps it off the old checkpoints.
    recreated = _trainer_pods(SPECS["multi-node-gpu"], 4, "0a1b2c3d-0000-4000-8000-000000000002")
    assert {"name": "GLMTUNE_WORKDIR", "value": "/workspace/shared/chat-0a1b2c3d/run-4"} in recreated[
        "Master"]["containers"][0]["env"]


def test_work_dir_claim_and_pvc_uris_on_the_same_claim_get_distinct_volumes():
    pod = _trainer_pods(SPECS["shared-workdir-and-pvc-uris"], 1)["Worker"]
    names_ = [volume["name"] for volume in pod["volumes"]]
    assert len(names_) == len(set(names_))
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["shared", "shared"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/workspace/shared", "/mnt/pvc/shared"} <= mounts


def test_without_a_claim_each_pod_works_in_its_own_empty_dir():
    for pod in _trainer_pods(SPECS["multi-node-ddp"], 2).values():
        [container] = pod["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert (env["GLMTUNE_WORKDIR"], env["GLMTUNE_CACHE"]) == ("/workspace/run", "/workspace/cache")
        assert {"name": "workspace", "emptyDir": {}} in pod["volumes"]
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]


def test_deployment_rolls_without_losing_capacity_and_gates_on_health():
    ft, owner = built(base_spec(serving={"replicas": 3, "port": 8080, "readyDeadlineSeconds": 120,
                                         "resources": {"gpus": 1, "memory": "32Gi"}}))
    deployment = builders.build_deployment(ft, owner, "s3://models/finetuned/chat/run-7", 7, SETTINGS)
    spec = deployment["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert spec["replicas"] == 3 and spec["progressDeadlineSeconds"] == 900
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    [container] = spec["template"]["spec"]["containers"]
    assert container["command"][:3] == ["glmtune", "serve", "$(GLMTUNE_MODEL_URI)"]
    assert container["command"][3:7] == ["--host", "0.0.0.0", "--port", "8080"]
    assert {"name": "GLMTUNE_MODEL_URI", "value": "s3://models/finetuned/chat/run-7"} in container["env"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 120
    assert container["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": 1}
    service = builders.build_service(ft, owner)
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]


def _serve_args(container: dict[str, Any]) -> Any:
    """The server container's command as `glmtune serve` itself parses it."""
    import argparse

    from glmtune_inference.cli import register

    parser = argparse.ArgumentParser(prog="glmtune")
    register(parser.add_subparsers(dest="command"))
    assert container["command"][:2] == ["glmtune", "serve"]
    return parser.parse_args(container["command"][1:])


def test_api_key_comes_from_the_secret_and_extra_adapters_reach_the_server():
    from glmtune_inference.cli import API_KEY_ENV, parse_adapters

    ft, owner = built(SPECS["served-with-api-key-and-adapters"])
    deployment = builders.build_deployment(ft, owner, "s3://models/finetuned/chat/run-3", 3, SETTINGS)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "chat-api", "key": "token"}}} in container["env"]
    args = _serve_args(container)
    assert args.model_name == "chat"
    assert parse_adapters(args.adapter) == {"support": "s3://models/adapters/support",
                                            "sales": "/mnt/pvc/exports/sales/run-3"}
    assert {"name": "pvc-exports", "persistentVolumeClaim": {"claimName": "exports"}} in pod["volumes"]
    assert {"name": "pvc-exports", "mountPath": "/mnt/pvc/exports"} in container["volumeMounts"]


def test_without_serving_extras_the_api_is_open_and_serves_one_model():
    ft, owner = built(base_spec())
    [container] = builders.build_deployment(ft, owner, "s3://m/run-1", 1, SETTINGS)["spec"]["template"]["spec"][
        "containers"]
    assert not [env for env in container["env"] if env["name"] == builders.API_KEY_ENV]
    assert _serve_args(container).adapter == []


def test_server_device_and_dtype_reach_glmtune_serve():
    """A GPU pod serves with `--device auto` by default (its GPU when the pod has one); an explicit device and
    dtype from the spec are passed through as the server parses them."""
    ft, owner = built(base_spec(serving={"resources": {"gpus": 1}}))
    [container] = builders.build_deployment(ft, owner, "s3://m/run-1", 1, SETTINGS)["spec"]["template"]["spec"][
        "containers"]
    args = _serve_args(container)
    assert (args.device, args.dtype) == ("auto", "auto")
    ft, owner = built(base_spec(serving={"resources": {"gpus": 2}, "device": "cuda:1", "dtype": "float16"}))
    [container] = builders.build_deployment(ft, owner, "s3://m/run-1", 1, SETTINGS)["spec"]["template"]["spec"][
        "containers"]
    args = _serve_args(container)
    assert (args.device, args.dtype) == ("cuda:1", "float16")


def test_server_pods_drain_before_they_stop():
    """After SIGTERM the server answers 503 for the drain notice, then finishes streams: the pod's grace period
    must cover both, or Kubernetes kills open generations."""
    ft, owner = built(base_spec())
    pod = builders.build_deployment(ft, owner, "s3://m/run-1", 1, SETTINGS)["spec"]["template"]["spec"]
    args = _serve_args(pod["containers"][0])
    assert args.drain_notice > 0
    assert pod["terminationGracePeriodSeconds"] > args.drain_notice + args.drain_timeout


def test_children_are_owned_and_labelled():
    ft, owner = built(SPECS["single-cpu"], labels={"team": "nlp"})
    children = [builders.build_config_map(ft, owner, 5), builders.build_pytorchjob(ft, owner, 5, SETTINGS),
                builders.build_deployment(ft, owner, "s3://m/run-5", 5, SETTINGS), builders.build_service(ft, owner)]
    for child in children:
        meta = child["metadata"]
        [ref] = meta["ownerReferences"]
        assert ref == {"apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "name": "chat", "uid": OWNER_UID,
                       "controller": True, "blockOwnerDeletion": True}
        assert meta["namespace"] == "ml" and meta["labels"]["team"] == "nlp"
        assert meta["labels"][names.LABEL_INSTANCE] == "chat"
        assert meta["labels"][names.LABEL_MANAGED_BY] == names.MANAGED_BY
    assert all(child["metadata"]["labels"]["glmtune.io/run"] == "5" for child in children[:3])


def test_builders_are_deterministic():
    first, second = built(SPECS["multi-node-gpu"]), built(SPECS["multi-node-gpu"])
    assert builders.build_pytorchjob(*first, 2, SETTINGS) == builders.build_pytorchjob(*second, 2, SETTINGS)
    assert builders.build_config_map(*first, 2) == builders.build_config_map(*second, 2)


@pytest.mark.parametrize("name", ["chat", "9lives", "a" * 63, "x-" * 31 + "y"])
def test_names_fit_kubernetes_limits_and_are_stable(name):
    for run in (1, 12345):
        job = names.job_name(name, run)
        assert job == names.job_name(name, run)  # deterministic
        assert job[0].isalpha() and len(f"{job}-worker-1023") <= 63
        assert job.endswith(f"-run-{run}") and len(names.config_map_name(name, run)) <= 63
    server = names.server_name(name)
    assert server[0].isalpha() and len(server) <= 63 and server.endswith("-server")
    assert names.job_name(name, 1) != names.job_name(name + "x" if len(name) < 63 else name[:-1] + "z", 1)
