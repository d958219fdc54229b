"""The `GLMFineTune` resource: metadata, the spec with its cross-section rules, and the status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from glmtune.spec.base import API_GROUP, API_VERSION, DNS_LABEL_PATTERN, KIND, SpecFieldError, SpecModel
from glmtune.spec.cluster import ImagesSpec, ResourcesSpec, RunPolicySpec, S3Spec, ServingSpec
from glmtune.spec.data import DataSpec
from glmtune.spec.method import MethodSpec
from glmtune.spec.model import ModelSpec
from glmtune.spec.output import OutputSpec
from glmtune.spec.status import GLMFineTuneStatus
from glmtune.spec.training import TrainingSpec

_PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Cross-section rules as CEL, so `kubectl apply` rejects what the pydantic validator below rejects.
_SPEC_RULES = [
    {
        "rule": "self.method.name != 'adalora' || (has(self.method.adalora) && has(self.method.adalora.totalStep))"
        " || has(self.training.maxSteps)",
        "message": "adalora needs method.adalora.totalStep or training.maxSteps",
    },
    {
        "rule": "!(has(self.training.deepspeed) && self.training.deepspeed.stage == 3"
        " && has(self.model.quantization) && self.model.quantization.bits == 4)",
        "message": "DeepSpeed ZeRO-3 cannot shard 4-bit quantized weights",
    },
    {
        "rule": "!(self.method.name == 'ptv2' && has(self.training.deepspeed) && self.training.deepspeed.stage == 3)",
        "message": "ptv2 does not work with DeepSpeed ZeRO-3",
    },
    {
        "rule": "!has(self.model.quantization) || self.model.quantization.backend != 'bitsandbytes'"
        " || self.method.name in ['lora', 'adalora']",
        "message": "the bitsandbytes backend only works with lora or adalora",
    },
    {
        "rule": "!has(self.model.quantization) || !(self.method.name in ['full', 'freeze'])",
        "message": "full and freeze training cannot update quantized weights",
    },
    {
        "rule": "self.output.export != 'adapter' || !(self.method.name in ['full', 'freeze'])",
        "message": "full and freeze training have no adapter to export: use export: merged",
    },
    {
        "rule": "self.output.export != 'adapter' || !has(self.output.bits)",
        "message": "output.bits re-quantizes a merged export; an adapter export has no base weights",
    },
    {
        "rule": "!(self.method.name == 'adalora' && has(self.training.deepspeed))",
        "message": "adalora reallocates ranks from whole gradients, which DeepSpeed ZeRO shards: drop training.deepspeed",
    },
    {
        "rule": "!(has(self.training.evaluation) && has(self.training.evaluation.generationMetrics)"
        " && self.training.evaluation.generationMetrics && has(self.training.deepspeed)"
        " && has(self.training.deepspeed.stage) && self.training.deepspeed.stage == 3)",
        "message": "generationMetrics needs whole weights on every rank, which ZeRO-3 shards",
    },
    {
        "rule": "!(has(self.training.evaluation) && has(self.training.evaluation.generationMetrics)"
        " && self.training.evaluation.generationMetrics"
        " && (!has(self.data.evalSplit) || self.data.evalSplit == 0.0))",
        "message": "generationMetrics needs held-out samples: set data.evalSplit above 0",
    },
    {
        "rule": "!(has(self.training.deepspeed) && has(self.resources) && has(self.resources.nodes)"
        " && self.resources.nodes > 1) || has(self.resources.workdirClaim)",
        "message": "DeepSpeed on more than one node needs resources.workdirClaim (a ReadWriteMany claim): "
        "every rank reads all ZeRO optimizer shards on resume",
    },
]


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

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _SPEC_RULES})

    model: ModelSpec = Field(description="The base model to fine-tune.")
    data: DataSpec = Field(description="Training data and how it is tokenized.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="Tuning method and its settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimization settings.")
    output: OutputSpec = Field(description="Where and how the fine-tuned model is exported.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Training pods (Kubernetes).")
    images: ImagesSpec = Field(default_factory=ImagesSpec, description="Container images (Kubernetes).")
    s3: S3Spec = Field(default_factory=S3Spec, description="S3 endpoint and credentials Secret.")
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Inference deployment after training."
    )
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Retries and deadlines (Kubernetes)."
    )

    @model_validator(mode="after")
    def _sections_agree(self) -> GLMFineTuneSpec:
        method, training, quant, output = (
            self.method.name,
            self.training,
            self.model.quantization,
            self.output,
        )
        stage = training.deepspeed.stage if training.deepspeed else None
        if method == "adalora":
            adalora = self.method.adalora
            total = adalora.total_step or training.max_steps
            if total is None:
                raise SpecFieldError(
                    ("method", "adalora", "totalStep"),
                    "adalora schedules its rank budget over a known number of steps: set method.adalora.totalStep "
                    "or training.maxSteps",
                )
            if adalora.tinit + adalora.tfinal >= total:
                raise SpecFieldError(
                    ("method", "adalora", "tinit"),
                    f"adalora tinit + tfinal ({adalora.tinit} + {adalora.tfinal}) must be below the total steps ({total})",
                )
        if stage == 3 and quant is not None and quant.bits == 4:
            raise SpecFieldError(
                ("training", "deepspeed", "stage"),
                "DeepSpeed ZeRO-3 cannot shard 4-bit quantized weights: use stage 2 or drop model.quantization",
            )
        if stage == 3 and method == "ptv2":
            raise SpecFieldError(
                ("training", "deepspeed", "stage"),
                "ptv2 prepends prefix key/values to every layer and does not work with ZeRO-3: use stage 2",
            )
        if quant is not None and quant.backend == "bitsandbytes" and method not in ("lora", "adalora"):
            raise SpecFieldError(
                ("model", "quantization", "backend"),
                f"the bitsandbytes backend only works with lora or adalora, not {method}",
            )
        if quant is not None and method in ("full", "freeze"):
            raise SpecFieldError(
                ("model", "quantization"),
                f"{method} training updates base weights, which cannot be quantized",
            )
        if output.export == "adapter" and method in ("full", "freeze"):
            raise SpecFieldError(
                ("output", "export"), f"{method} training has no adapter to export: use export: merged"
            )
        if method == "adalora" and training.deepspeed is not None:
            raise SpecFieldError(
                ("training", "deepspeed"),
                "adalora reallocates ranks from whole gradients, which DeepSpeed ZeRO shards: "
                "train adalora without training.deepspeed",
            )
        if training.evaluation.generation_metrics and stage == 3:
            raise SpecFieldError(
                ("training", "evaluation", "generationMetrics"),
                "generation needs whole weights on every rank, which ZeRO-3 shards: use stage 2 "
                "or turn generationMetrics off",
            )
        if training.evaluation.generation_metrics and self.data.eval_split == 0:
            raise SpecFieldError(
                ("training", "evaluation", "generationMetrics"),
                "generation metrics are computed on held-out samples: set data.evalSplit above 0",
            )
        if output.export == "adapter" and output.bits is not None:
            raise SpecFieldError(
                ("output", "bits"),
                "output.bits re-quantizes a merged export; an adapter export has no base weights",
            )
        resources = self.resources
        if training.deepspeed is not None and resources.nodes > 1 and resources.workdir_claim is None:
            raise SpecFieldError(
                ("resources", "workdirClaim"),
                f"DeepSpeed ZeRO on {resources.nodes} nodes needs one work dir shared by every pod: each rank "
                "writes its own optimizer shard and on resume every rank reads all of them. Set "
                "resources.workdirClaim to a ReadWriteMany PersistentVolumeClaim, or train without "
                "training.deepspeed (plain DDP works with a work dir per pod)",
            )
        return self

    @property
    def model_dtype(self) -> str:
        """dtype of the loaded base weights: `model.dtype`, else the one matching `training.precision`."""
        return self.model.dtype or _PRECISION_DTYPE[self.training.precision]


class GLMFineTune(SpecModel):
    """A whole GLMFineTune object as in a YAML file or the Kubernetes API."""

    api_version: Literal["glmtune.io/v1alpha1"] = Field(
        f"{API_GROUP}/{API_VERSION}", description="Always glmtune.io/v1alpha1."
    )
    kind: Literal["GLMFineTune"] = Field(KIND, description="Always GLMFineTune.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Kubernetes metadata.")
    spec: GLMFineTuneSpec = Field(description="What to fine-tune and how.")
    status: GLMFineTuneStatus | None = Field(None, description="Written by the operator.")

    @property
    def name(self) -> str:
        """The resource name (`metadata.name`), or `glmtune` when a local file gave none."""
        return self.metadata.name or "glmtune"

    def to_manifest(self) -> dict[str, Any]:
        """The object as a Kubernetes manifest: camelCase keys, defaults filled in, absent fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
