"""Pure functions from a validated GLMFineTune to the manifests of its children (no API calls).

One training run = a ConfigMap with the trainer's spec + a Kubeflow PyTorchJob (`kubeflow.org/v1`); serving
= a Deployment + Service running `glmtune serve` on the run's export. Every child is adopted by the
GLMFineTune (owner reference, so deleting it garbage-collects them) and carries deterministic names and
labels. `pvc://claim/path` URIs are mounted at `/mnt/pvc/<claim>` and rewritten to that local path.
Training pods work in their own emptyDir, or, with `resources.workdirClaim`, in one folder per run on that
shared claim (mounted at `/workspace/shared` in every pod, with the download cache beside the runs).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import kopf
import yaml

from glmtune.spec import GLMFineTune
from glmtune_operator import names
from glmtune_operator.settings import OperatorSettings

TRAINER_CONTAINER = "pytorch"  # the Kubeflow training operator finds the container by this name
SERVER_CONTAINER = "server"
SPEC_DIR = "/etc/glmtune"
SPEC_FILE = "spec.yaml"
WORKSPACE = "/workspace"
SHARED_WORKSPACE = f"{WORKSPACE}/shared"
PVC_ROOT = "/mnt/pvc"
MASTER_PORT = 23456  # Kubeflow's default port, named `pytorchjob-port`
GPU_RESOURCE = "nvidia.com/gpu"
MODEL_URI_ENV = "GLMTUNE_MODEL_URI"
API_KEY_ENV = "GLMTUNE_API_KEY"  # what `glmtune serve` reads its API key from (glmtune_inference.cli.API_KEY_ENV)
TRAINER_COMMAND = [
    "torchrun", "--nnodes=$(PET_NNODES)", "--nproc_per_node=$(PET_NPROC_PER_NODE)",
    "--node_rank=$(PET_NODE_RANK)", "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)",
    "-m", "glmtune_trainer", f"{SPEC_DIR}/{SPEC_FILE}",
]  # fmt: skip
_PVC = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?:/(?P<path>.*))?$")

Manifest = dict[str, Any]


def run_output_uri(output_uri: str, run: int) -> str:
    """Where run `run` exports: `<spec.output.uri>/run-<run>` (runs never overwrite each other)."""
    return f"{output_uri.rstrip('/')}/run-{run}"


def pvc_claim(uri: str) -> str | None:
    """The claim a `pvc://claim/path` URI names, else None."""
    match = _PVC.match(uri)
    return match.group("claim") if match else None


def localize(uri: str) -> str:
    """`pvc://claim/path` → `/mnt/pvc/claim/path` (where the pods mount the claim); other URIs unchanged."""
    match = _PVC.match(uri)
    if not match:
        return uri
    path = (match.group("path") or "").strip("/")
    return f"{PVC_ROOT}/{match.group('claim')}" + (f"/{path}" if path else "")


def _volume_name(prefix: str, name: str) -> str:
    full = f"{prefix}-{name}"
    return full if len(full) <= 63 else f"{prefix}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _pvc_volumes(uris: Iterable[str | None]) -> tuple[list[Manifest], list[Manifest]]:
    claims = sorted({claim for uri in uris if uri and (claim := pvc_claim(uri))})
    volumes = [{"name": _volume_name("pvc", c), "persistentVolumeClaim": {"claimName": c}} for c in claims]
    mounts = [{"name": _volume_name("pvc", c), "mountPath": f"{PVC_ROOT}/{c}"} for c in claims]
    return volumes, mounts


def trainer_spec(ft: GLMFineTune, run: int) -> Manifest:
    """The spec the trainer reads: exporting to the run's own prefix, pvc:// URIs as mounted paths."""
    manifest = ft.to_manifest()
    spec = manifest["spec"]
    spec["output"]["uri"] = localize(run_output_uri(ft.spec.output.uri, run))
    if "uri" in spec["model"]:
        spec["model"]["uri"] = localize(spec["model"]["uri"])
    if "tokenizer" in spec["model"].get("create", {}):
        spec["model"]["create"]["tokenizer"] = localize(spec["model"]["create"]["tokenizer"])
    spec["data"]["sources"] = [localize(uri) for uri in spec["data"]["sources"]]
    if "cache" in spec["data"]:
        spec["data"]["cache"] = localize(spec["data"]["cache"])
    checkpoint = spec["training"]["checkpoint"]
    if checkpoint["resume"] not in ("auto", "never"):
        checkpoint["resume"] = localize(checkpoint["resume"])
    return {"apiVersion": manifest["apiVersion"], "kind": manifest["kind"],
            "metadata": {"name": ft.name, "namespace": ft.metadata.namespace}, "spec": spec}


def _adopted(manifest: Manifest, owner: Mapping[str, Any]) -> Manifest:
    kopf.adopt(manifest, owner=owner)  # owner reference + namespace + the owner's labels
    return manifest


def build_config_map(ft: GLMFineTune, owner: Mapping[str, Any], run: int) -> Manifest:
    """The ConfigMap with run `run`'s trainer spec, mounted at /etc/glmtune in every training pod."""
    text = yaml.safe_dump(trainer_spec(ft, run), sort_keys=False, allow_unicode=True)
    return _adopted({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": names.config_map_name(ft.name, run),
                     "labels": names.labels(ft.name, "trainer", run, ft.metadata.labels)},
        "data": {SPEC_FILE: text},
    }, owner)


def s3_env(ft: GLMFineTune, settings: OperatorSettings) -> list[Manifest]:
    """AWS_* variables for the pods: credentials from the Secret (never inline), endpoint and region."""
    s3, env = ft.spec.s3, []
    if s3.secret_ref is not None:
        ref = s3.secret_ref
        for var, key in (("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
                         ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    endpoint = s3.endpoint or settings.s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    if s3.region:
        env += [{"name": "AWS_REGION", "value": s3.region}, {"name": "AWS_DEFAULT_REGION", "value": s3.region}]
    return env


def _resources(cpu: str | None, memory: str | None, gpus: int) -> Manifest:
    sized = {key: value for key, value in (("cpu", cpu), ("memory", memory)) if value is not None}
    limits = {**sized, **({GPU_RESOURCE: gpus} if gpus else {})}
    return {key: value for key, value in (("requests", sized), ("limits", limits)) if value}


def shared_workdir(ft: GLMFineTune, owner: Mapping[str, Any], run: int) -> str:
    """Run `run`'s work dir on the `workdirClaim` volume; the uid keeps a re-created namesake off old checkpoints."""
    return f"{SHARED_WORKSPACE}/{ft.name}-{owner['metadata']['uid'][:8]}/run-{run}"


def _work_dirs(ft: GLMFineTune, owner: Mapping[str, Any], run: int) -> tuple[list[Manifest], list[Manifest],
                                                                               list[Manifest]]:
    """Volumes, mounts and env of the trainer's work dir and download cache: in the pod's emptyDir, or on the
    shared claim, cache included, so every node sees the base model where the node that prepared it put it."""
    volumes: list[Manifest] = [{"name": "workspace", "emptyDir": {}}]
    mounts: list[Manifest] = [{"name": "workspace", "mountPath": WORKSPACE}]
    claim = ft.spec.resources.workdir_claim
    if claim is None:
        workdir, cache = f"{WORKSPACE}/run", f"{WORKSPACE}/cache"
    else:
        volumes.append({"name": "shared-workdir", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "shared-workdir", "mountPath": SHARED_WORKSPACE})
        workdir, cache = shared_workdir(ft, owner, run), f"{SHARED_WORKSPACE}/cache"
    return volumes, mounts, [{"name": "GLMTUNE_WORKDIR", "value": workdir}, {"name": "GLMTUNE_CACHE", "value": cache}]


def _replica(ft: GLMFineTune, owner: Mapping[str, Any], run: int, replicas: int, settings: OperatorSettings,
             config_map: str) -> Manifest:
    res = ft.spec.resources
    pvc_volumes, pvc_mounts = _pvc_volumes(ft.spec.locations().values())
    work_volumes, work_mounts, work_env = _work_dirs(ft, owner, run)
    env = [
        *work_env,
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{WORKSPACE}/torch-extensions"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        *s3_env(ft, settings),
    ]
    container = {
        "name": TRAINER_CONTAINER,
        "image": ft.spec.images.trainer or settings.trainer_image,
        "command": list(TRAINER_COMMAND),
        "env": env,
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *work_mounts,
            *pvc_mounts,
        ],
    }
    if resources := _resources(res.cpu, res.memory, res.gpus_per_node):
        container["resources"] = resources
    pod: Manifest = {
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": config_map}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and DataLoader workers need a big /dev/shm
            *work_volumes,
            *pvc_volumes,
        ],
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.priority_class_name:
        pod["priorityClassName"] = res.priority_class_name
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",
        "template": {"metadata": {"labels": names.labels(ft.name, "trainer", run, ft.metadata.labels)},
                     "spec": pod},
    }


def build_pytorchjob(ft: GLMFineTune, owner: Mapping[str, Any], run: int, settings: OperatorSettings) -> Manifest:
    """Run `run`'s Kubeflow PyTorchJob: Master 1 + Workers nodes-1, `torchrun` of the trainer in each pod."""
    res, policy = ft.spec.resources, ft.spec.run_policy
    config_map = names.config_map_name(ft.name, run)
    replicas = {"Master": _replica(ft, owner, run, 1, settings, config_map)}
    if res.nodes > 1:
        replicas["Worker"] = _replica(ft, owner, run, res.nodes - 1, settings, config_map)
    run_policy: Manifest = {"backoffLimit": policy.backoff_limit, "suspend": policy.suspend}
    if policy.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return _adopted({
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": names.job_name(ft.name, run),
                     "labels": names.labels(ft.name, "trainer", run, ft.metadata.labels)},
        "spec": {"nprocPerNode": str(res.procs_per_node), "runPolicy": run_policy,
                 "pytorchReplicaSpecs": replicas},
    }, owner)


# After SIGTERM the server keeps answering 503 (and failing /readyz) this long so the Service stops routing to
# it before it closes its socket, then gives open streams DRAIN_TIMEOUT_SECONDS to finish.
DRAIN_NOTICE_SECONDS = 5
DRAIN_TIMEOUT_SECONDS = 30


def _api_key_env(ft: GLMFineTune) -> list[Manifest]:
    """The server's API key, from the Secret `serving.apiKeySecret` names (never a literal in the manifest)."""
    ref = ft.spec.serving.api_key_secret
    if ref is None:
        return []
    return [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def serving_model_name(ft: GLMFineTune) -> str:
    """The `model` name clients use in the OpenAI API."""
    return ft.spec.serving.model_name or ft.name


def build_deployment(ft: GLMFineTune, owner: Mapping[str, Any], model_uri: str, run: int,
                     settings: OperatorSettings) -> Manifest:
    """The inference Deployment serving `model_uri` (run `run`'s export), rolled without losing capacity."""
    serving = ft.spec.serving
    adapter_uris = [adapter.uri for adapter in serving.adapters]
    pvc_volumes, pvc_mounts = _pvc_volumes([ft.spec.model.uri, ft.spec.output.uri, *adapter_uris])
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    adapters = [arg for a in serving.adapters for arg in ("--adapter", f"{a.name}={localize(a.uri)}")]
    container = {
        "name": SERVER_CONTAINER,
        "image": ft.spec.images.server or settings.server_image,
        "command": ["glmtune", "serve", f"$({MODEL_URI_ENV})", "--host", "0.0.0.0", "--port", str(serving.port),
                    "--model-name", serving_model_name(ft), "--max-batch", str(serving.max_batch_size),
                    "--device", serving.device, "--dtype", serving.dtype,
                    "--drain-notice", str(DRAIN_NOTICE_SECONDS), "--drain-timeout", str(DRAIN_TIMEOUT_SECONDS),
                    *adapters],
        "env": [{"name": MODEL_URI_ENV, "value": localize(model_uri)},
                {"name": "GLMTUNE_CACHE", "value": "/cache"},
                {"name": "HF_HUB_OFFLINE", "value": "1"},
                *_api_key_env(ft),
                *s3_env(ft, settings)],
        "ports": [{"name": "http", "containerPort": serving.port, "protocol": "TCP"}],
        # Loading a model may take minutes: the startup probe holds liveness off until the deadline.
        "startupProbe": {**probe, "failureThreshold": max(1, math.ceil(serving.ready_deadline_seconds / 10))},
        "livenessProbe": {**probe, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "volumeMounts": [{"name": "cache", "mountPath": "/cache"}, *pvc_mounts],
    }
    res = serving.resources
    if resources := _resources(res.cpu, res.memory, res.gpus):
        container["resources"] = resources
    selector = names.selector_labels(ft.name, "server")
    return _adopted({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": names.server_name(ft.name),
                     "labels": names.labels(ft.name, "server", run, ft.metadata.labels)},
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "progressDeadlineSeconds": settings.rollout_deadline_seconds,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": names.labels(ft.name, "server", run, ft.metadata.labels)},
                "spec": {"containers": [container],
                         # Room for the drain notice (endpoints drop the pod) and the open streams to finish.
                         "terminationGracePeriodSeconds": DRAIN_NOTICE_SECONDS + DRAIN_TIMEOUT_SECONDS + 5,
                         "volumes": [{"name": "cache", "emptyDir": {}}, *pvc_volumes]},
            },
        },
    }, owner)


def build_canary_deployment(ft: GLMFineTune, owner: Mapping[str, Any], model_uri: str, run: int,
                            settings: OperatorSettings) -> Manifest:
    """The canary Deployment of `model_uri`: the server pods' template plus the canary track label, so the
    Service sends them a share of the traffic by pod count and the operator can reach them alone."""
    manifest = build_deployment(ft, owner, model_uri, run, settings)
    canary = names.canary_selector(ft.name)
    manifest["metadata"]["name"] = names.canary_name(ft.name)
    manifest["metadata"]["labels"].update(canary)
    spec = manifest["spec"]
    spec["replicas"] = ft.spec.serving.promotion.canary.replicas
    spec["selector"] = {"matchLabels": canary}
    spec["template"]["metadata"]["labels"].update(canary)
    return manifest


def build_service(ft: GLMFineTune, owner: Mapping[str, Any]) -> Manifest:
    """The Service in front of the inference pods (OpenAI-compatible API on `serving.port`)."""
    serving = ft.spec.serving
    return _adopted({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": names.server_name(ft.name), "labels": names.labels(ft.name, "server", None,
                                                                               ft.metadata.labels)},
        "spec": {"type": serving.service_type, "selector": names.selector_labels(ft.name, "server"),
                 "ports": [{"name": "http", "port": serving.port, "targetPort": "http", "protocol": "TCP"}]},
    }, owner)
