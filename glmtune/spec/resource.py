"""The `GLMFineTune` resource: metadata, the spec with its cross-section rules, and the status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, model_validator

from glmtune.spec.base import API_GROUP, API_VERSION, DNS_LABEL_PATTERN, KIND, SpecModel
from glmtune.spec.cluster import ImagesSpec, ResourcesSpec, RunPolicySpec, S3Spec, ServingSpec
from glmtune.spec.data import DataSpec
from glmtune.spec.method import MethodSpec
from glmtune.spec.model import ModelSpec
from glmtune.spec.output import OutputSpec
from glmtune.spec.rules import crd_validations, enforce
from glmtune.spec.status import GLMFineTuneStatus
from glmtune.spec.training import TrainingSpec

_PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

class ObjectMeta(SpecModel):
    """Kubernetes object metadata; fields other than these (uid, resourceVersion, ...) are kept as they are."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(
        None,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Resource name (a DNS label); names the job, the service and the model. Default: the file name.",
    )
    namespace: str | None = Field(None, description="Kubernetes namespace.")
    labels: dict[str, str] = Field({}, description="Labels, copied onto every child object.")
    annotations: dict[str, str] = Field({}, description="Annotations.")


class GLMFineTuneSpec(SpecModel):
    """Everything a user sets: model, data, method, training, output and the cluster-side sections."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec"))

    model: ModelSpec = Field(description="The base model to fine-tune.")
    data: DataSpec = Field(description="Training data and how it is tokenized.")
    # Absent sections with rules default to `{}` validated like a written one, as the API server defaults them
    # to `{}`: their rules (and recorded verdicts) then run in both places.
    method: MethodSpec = Field(
        default_factory=dict, validate_default=True, description="Tuning method and its settings."
    )
    training: TrainingSpec = Field(
        default_factory=dict, validate_default=True, description="Optimization settings."
    )
    output: OutputSpec = Field(description="Where and how the fine-tuned model is exported.")
    resources: ResourcesSpec = Field(
        default_factory=dict, validate_default=True, description="Training pods (Kubernetes)."
    )
    images: ImagesSpec = Field(default_factory=ImagesSpec, description="Container images (Kubernetes).")
    s3: S3Spec = Field(default_factory=S3Spec, description="S3 endpoint and credentials Secret.")
    serving: ServingSpec = Field(
        default_factory=dict, validate_default=True, description="Inference deployment after training."
    )
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Retries and deadlines (Kubernetes)."
    )

    @model_validator(mode="after")
    def _sections_agree(self, info: ValidationInfo) -> GLMFineTuneSpec:
        enforce(self, "spec", info)
        if self.output.export is None:
            # Absent export: the method's own form (a ptv2 prefix cannot be merged; the rules saw it absent).
            self.output.export = "adapter" if self.method.name == "ptv2" else "merged"
        return self

    def locations(self) -> dict[str, str]:
        """Every storage location a training run reads or writes, by field path (absent ones left out): what the
        trainer resolves against its work dir and the operator mounts or checks."""
        create, resume = self.model.create, self.training.checkpoint.resume
        found = {
            "spec.model.uri": self.model.uri,
            "spec.model.create.tokenizer": create.tokenizer if create is not None else None,
            **{f"spec.data.sources[{i}]": source for i, source in enumerate(self.data.sources)},
            "spec.data.cache": self.data.cache,
            "spec.output.uri": self.output.uri,
            "spec.training.checkpoint.mirrorUri": self.training.checkpoint.mirror_uri,
            "spec.training.checkpoint.resume": resume if resume not in ("auto", "never") else None,
        }
        return {where: value for where, value in found.items() if value}

    @property
    def model_dtype(self) -> str:
        """dtype of the loaded base weights, the one rule the trainer follows: `model.dtype`; else float32 for
        methods that train the base weights (full, freeze: they are the master weights, autocast computes in
        `training.precision`); else the dtype matching `training.precision`."""
        if self.model.dtype is not None:
            return self.model.dtype
        return "float32" if self.method.name in ("full", "freeze") else _PRECISION_DTYPE[self.training.precision]


class GLMFineTune(SpecModel):
    """A whole GLMFineTune object as in a YAML file or the Kubernetes API."""

    api_version: Literal["glmtune.io/v1alpha1"] = Field(
        f"{API_GROUP}/{API_VERSION}", description="Always glmtune.io/v1alpha1."
    )
    kind: Literal["GLMFineTune"] = Field(KIND, description="Always GLMFineTune.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Kubernetes metadata.")
    spec: GLMFineTuneSpec = Field(description="What to fine-tune and how.")
    status: GLMFineTuneStatus | None = Field(None, description="Written by the operator.")

    @model_validator(mode="after")
    def _whole_resource_rules(self, info: ValidationInfo) -> GLMFineTune:
        enforce(self, "", info)
        return self

    @property
    def name(self) -> str:
        """The resource name (`metadata.name`), or `glmtune` when a local file gave none."""
        return self.metadata.name or "glmtune"

    def to_manifest(self) -> dict[str, Any]:
        """The object as a Kubernetes manifest: camelCase keys, defaults filled in, absent fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
