"""`spec.training`: optimization, precision, DeepSpeed, checkpoints and evaluation of one training run."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glmtune.spec.base import S3Uri, SpecModel, check_storage_uri
from glmtune.spec.rules import crd_validations, enforce

Optimizer = Literal["adamw", "adam", "lion", "lamb", "adafactor", "adamw8bit"]
Scheduler = Literal["linear", "cosine", "cosineWithRestarts", "constant"]
Precision = Literal["fp32", "fp16", "bf16"]


class DeepSpeedSpec(SpecModel):
    """Run the training under DeepSpeed ZeRO (sharded optimizer state, gradients and parameters)."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.training.deepspeed"))

    stage: int = Field(
        2, ge=0, le=3, description="ZeRO stage: 0 (off), 1 (optimizer), 2 (+gradients), 3 (+weights)."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> DeepSpeedSpec:
        enforce(self, "spec.training.deepspeed", info)
        return self


class CheckpointSpec(SpecModel):
    """When checkpoints are written, how many are kept, where they are mirrored and how a run resumes."""

    every_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N optimizer steps (besides the end of each epoch)."
    )
    every_minutes: float | None = Field(
        None, gt=0, description="Checkpoint when this many minutes passed since the last checkpoint."
    )
    keep_last: int = Field(
        2, ge=1, description="Number of most recent checkpoints kept; older ones are deleted."
    )
    mirror_uri: S3Uri | None = Field(
        None,
        description="`s3://` prefix that every checkpoint is copied to, so a rescheduled pod can resume.",
    )
    resume: str = Field(
        "auto",
        description=(
            "`auto`: resume from the newest complete checkpoint (local or mirror) if any; `never`: start fresh; "
            "otherwise a checkpoint path or `s3://` URI to resume from."
        ),
    )

    @field_validator("resume")
    @classmethod
    def _resume_location(cls, value: str) -> str:
        return value if value in ("auto", "never") else check_storage_uri(value)


class EvaluationSpec(SpecModel):
    """Evaluation on the held-out split (`data.evalSplit`)."""

    every_epoch: bool = Field(True, description="Evaluate loss (and metrics) at the end of every epoch.")
    generation_metrics: bool = Field(
        False, description="Also generate answers and report BLEU-4 and Rouge-L (slower)."
    )
    max_samples: int | None = Field(
        None, ge=1, description="Evaluate on at most this many held-out samples (absent: all of them)."
    )


class TrainingSpec(SpecModel):
    """Optimization settings of the training run."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.training"))

    epochs: int = Field(
        1, ge=1, le=100000, description="Passes over the training data (ignored with maxSteps)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps; overrides `epochs` when set."
    )
    batch_size: int = Field(4, ge=1, le=65536, description="Samples per device per forward pass.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=65536, description="Forward passes per optimizer step."
    )
    learning_rate: float = Field(
        2e-4, gt=0.0, le=1.0, description="Peak learning rate (typical: lora 2e-4, ptv2 2e-2, full 2e-5)."
    )
    optimizer: Optimizer = Field(
        "adamw", description="adamw, adam, lion, lamb, adafactor or adamw8bit (bitsandbytes 8-bit AdamW)."
    )
    scheduler: Scheduler = Field(
        "linear",
        description="Learning-rate schedule after warm-up: linear, cosine, cosineWithRestarts, constant.",
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warm-up steps (exclusive with warmupRatio)."
    )
    warmup_ratio: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Warm-up as a fraction of the total steps (exclusive with warmupSteps).",
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0: no clipping).")
    precision: Precision = Field(
        "fp32", description="Training precision: fp32, fp16 (loss-scaled, mixed) or bf16."
    )
    seed: int = Field(42, ge=0, description="Seed for weights of new parameters, dropout and data order.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% slower)."
    )
    max_bad_steps: int = Field(
        10,
        ge=1,
        description="NaN/Inf guard: steps with a non-finite loss or gradient are skipped; stop after N in a row.",
    )
    log_every_steps: int = Field(
        10, ge=1, description="Log loss, learning rate and throughput every N steps."
    )
    deepspeed: DeepSpeedSpec | None = Field(
        None, description="Train under DeepSpeed ZeRO (absent: plain DDP)."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpointing and resume."
    )
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Held-out evaluation.")

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> TrainingSpec:
        enforce(self, "spec.training", info)
        return self
