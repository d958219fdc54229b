"""Kubernetes-side sections: training resources, images, S3 access, serving and the run policy."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, model_validator

from glmtune.spec.base import DNS_SUBDOMAIN_PATTERN, Quantity, SpecFieldError, SpecModel, StorageUri
from glmtune.spec.model import ServingDtype
from glmtune.spec.promotion import PromotionSpec
from glmtune.spec.rules import crd_validations, enforce

MODEL_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
SERVING_DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # glmtune.export_loading.DEVICE_PATTERN (torch-free here)
_INLINE_CREDENTIALS = {
    "accessKeyId", "access_key_id", "secretAccessKey", "secret_access_key", "accessKey", "access_key",
    "secretKey", "secret_key", "sessionToken", "session_token", "awsAccessKeyId", "awsSecretAccessKey",
}  # fmt: skip


class Toleration(SpecModel):
    """A Kubernetes pod toleration (same fields as core/v1 Toleration)."""

    key: str | None = Field(None, description="Taint key the toleration applies to (empty: all keys).")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value to match with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match (empty: all effects)."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="With NoExecute: how long the pod stays bound after the taint appears."
    )


class ResourcesSpec(SpecModel):
    """Size and placement of the training job (PyTorchJob: 1 master + nodes-1 workers)."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.resources"))

    nodes: int = Field(1, ge=1, le=1024, description="Pods in the job (1 master + nodes-1 workers).")
    gpus_per_node: int = Field(0, ge=0, le=64, description="`nvidia.com/gpu` per pod (0: train on CPU).")
    nproc_per_node: int | None = Field(
        None, ge=1, le=256, description="Training processes per pod; default: gpusPerNode, or 1 on CPU."
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit per pod (e.g. `8`, `500m`).")
    memory: Quantity | None = Field(None, description="Memory request and limit per pod (e.g. `64Gi`).")
    node_selector: dict[str, str] = Field({}, description="Node labels the pods must run on.")
    tolerations: list[Toleration] = Field([], description="Taints the pods tolerate.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the training pods.")
    workdir_claim: str | None = Field(
        None,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="ReadWriteMany PersistentVolumeClaim mounted by every training pod at `/workspace/shared`: "
        "run N works in `<name>-<uid prefix>/run-<N>` on it and downloads are cached once in `cache/`. "
        "Absent: a work dir per pod (emptyDir). Required for `training.deepspeed` on more than one node, "
        "because every rank reads all ZeRO optimizer shards on resume.",
    )

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> ResourcesSpec:
        enforce(self, "spec.resources", info)
        return self

    @property
    def procs_per_node(self) -> int:
        """Training processes per pod after defaults (nprocPerNode, else gpusPerNode, else 1)."""
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        """Total training processes across all pods."""
        return self.nodes * self.procs_per_node


class ImagesSpec(SpecModel):
    """Container images; absent ones are filled by the operator from its Helm values."""

    trainer: str | None = Field(None, description="Image of the training pods (Dockerfile.train).")
    server: str | None = Field(None, description="Image of the inference pods (Dockerfile.serve).")


class SecretRef(SpecModel):
    """A Kubernetes Secret in the resource's namespace holding the S3 credentials."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Name of the Secret.")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID", description="Key of the access key id in the Secret.")
    secret_access_key_key: str = Field(
        "AWS_SECRET_ACCESS_KEY", description="Key of the secret access key in the Secret."
    )


class S3Spec(SpecModel):
    """How pods reach S3; credentials come from a Secret, never from the spec itself."""

    secret_ref: SecretRef | None = Field(
        None, description="Secret with the credentials (absent: the pods' ambient credentials, e.g. IRSA)."
    )
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph); absent: AWS.",
    )
    region: str | None = Field(None, description="S3 region (e.g. `us-east-1`).")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in _INLINE_CREDENTIALS:
                    raise SpecFieldError(
                        (key,),
                        "credentials never go into the spec: store them in a Secret and reference it with "
                        "s3.secretRef {name, accessKeyIdKey, secretAccessKeyKey}",
                    )
        return data


class ServingResources(SpecModel):
    """Resources of one inference pod."""

    cpu: Quantity | None = Field(None, description="CPU request and limit (e.g. `4`).")
    memory: Quantity | None = Field(None, description="Memory request and limit (e.g. `32Gi`).")
    gpus: int = Field(0, ge=0, le=16, description="`nvidia.com/gpu` per inference pod.")


class SecretKeyRef(SpecModel):
    """One key of a Kubernetes Secret in the resource's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Name of the Secret.")
    key: str = Field("api-key", max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret.")


class ServingAdapter(SpecModel):
    """An adapter or ptv2 prefix export served beside the trained model, over the same base weights."""

    name: str = Field(
        max_length=63,
        pattern=MODEL_NAME_PATTERN,
        description="Model name clients ask for in the OpenAI API (`model` field) to get this adapter.",
    )
    uri: StorageUri = Field(
        description="The export to serve: an `adapter` or `prefix` export (glmtune-export.json) at `s3://` or "
        "`pvc://claim/path`, trained over the same base model as the served one."
    )


class ServingSpec(SpecModel):
    """The inference Deployment + Service rolled out after each successful run (OpenAI-compatible API)."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.serving"))

    enabled: bool = Field(True, description="Serve the exported model after training.")
    replicas: int = Field(1, ge=0, le=1000, description="Inference pods.")
    resources: ServingResources = Field(default_factory=ServingResources, description="Per-pod resources.")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Kubernetes Service type."
    )
    model_name: str | None = Field(
        None,
        max_length=63,  # bounded, so the API server can cost the CEL rules that compare it
        pattern=MODEL_NAME_PATTERN,
        description="Model name in the OpenAI API (`model` field); default: the resource's metadata.name.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP API.")
    max_batch_size: int = Field(
        8, ge=1, le=1024, description="Requests batched together in one generation step."
    )
    device: str = Field(
        "auto",
        max_length=16,
        pattern=SERVING_DEVICE_PATTERN,
        description="Where the server runs the model (`glmtune serve --device`): `auto` (the pod's GPU when "
        "`resources.gpus` gives it one, else the CPU), `cpu`, `cuda` or `cuda:N`.",
    )
    dtype: ServingDtype = Field(
        "auto",
        description="Weights and activations dtype (`glmtune serve --dtype`): `auto` is float32 on CPU, bfloat16 "
        "on GPUs that support it (Ampere and newer), else float16.",
    )
    ready_deadline_seconds: int = Field(
        600,
        ge=10,
        description="How long a new model may take to load and become ready before the rollout fails.",
    )
    api_key_secret: SecretKeyRef | None = Field(
        None,
        description="Secret key holding the API key clients must send (`Authorization: Bearer KEY`); "
        "absent: the API is open to whoever reaches the Service.",
    )
    adapters: list[ServingAdapter] = Field(
        [],
        max_length=16,
        description="More adapter or ptv2 prefix exports served by the same pods under their own model names.",
    )
    promotion: PromotionSpec | None = Field(
        None,
        description="Gate each new model before it replaces the serving one: eval-loss gate against the serving "
        "model, then a canary Deployment that must answer the golden prompts and stay within its error and "
        "latency limits for canary.durationSeconds; a model that fails is removed and the old one keeps "
        "serving. Absent: a new model is rolled out as soon as its pods are ready.",
    )

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> ServingSpec:
        enforce(self, "spec.serving", info)
        return self


class RunPolicySpec(SpecModel):
    """Retry and lifetime policy of the training job (PyTorchJob runPolicy)."""

    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retries of failed training pods before the run fails."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail a run that trains longer than this (absent: no limit)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished training job after this many seconds (absent: keep it)."
    )
    suspend: bool = Field(False, description="Suspend: no new run starts and a running job is stopped.")
