"""`spec.model`: which base model to start from, in which dtype, optionally quantized or created at random."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, model_validator

from glmtune.spec.base import SpecModel, StorageUri
from glmtune.spec.rules import crd_validations, enforce

Family = Literal["v1", "v2", "v3", "glm4"]
Dtype = Literal["float32", "float16", "bfloat16"]
# Serving picks by device when "auto": float32 on a CPU, bfloat16 on GPUs that support it, else float16.
ServingDtype = Literal["auto", "float32", "bfloat16", "float16"]
Size = Literal["tiny", "small"]
# How a GLM-4 checkpoint is laid out: THUDM's remote code, or transformers' GlmForCausalLM (`-hf`).
Layout = Literal["remote", "hf"]


class QuantizationSpec(SpecModel):
    """Load the base weights quantized; only the tuned parameters stay in full precision."""

    bits: Literal[4, 8] = Field(description="Weight bits of the quantized base model: 4 or 8.")
    backend: Literal["glmtune", "bitsandbytes"] = Field(
        "glmtune",
        description=(
            "`glmtune`: ChatGLM's weight-only int8/int4 (the chatglm-6b-int4 format, runs on CPU and GPU); "
            "`bitsandbytes`: Linear8bitLt / 4-bit NF4 layers (QLoRA; only with lora or adalora)."
        ),
    )


class CreateSpec(SpecModel):
    """Create a random model and tokenizer from scratch instead of loading one (demos and tests)."""

    size: Size = Field(
        "tiny", description="Size of the random model: `tiny` (a few layers, seconds on a CPU) or `small`."
    )
    seed: int = Field(0, ge=0, description="Random seed for the weights, so a created model is reproducible.")
    tokenizer: StorageUri | None = Field(
        None,
        description=(
            "A tokenizer directory to use (e.g. a published model's, holding ice_text.model or tokenizer.model): "
            "vocabulary size and special token ids follow it, and its family must match `model.family`. "
            "Absent: a tiny tokenizer trained on the spot."
        ),
    )
    # No default value: an absent layout stays absent in manifests, so specs written before the field existed keep
    # their training fingerprint (the operator would otherwise start a new run on upgrade).
    layout: Layout | None = Field(
        None,
        description=(
            "Checkpoint layout of the created model: `remote` (THUDM's remote-code layout, every family; the "
            "default when absent) or `hf` "
            "(transformers' GlmForCausalLM, `family: glm4` only; training runs on an exact remote-code copy and "
            "the export goes back out as `hf`)."
        ),
    )


class ModelSpec(SpecModel):
    """The base model: a checkpoint to load (`uri`) or a random one to create (`create`)."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.model"))

    uri: StorageUri | None = Field(
        None,
        description=(
            "Checkpoint to fine-tune: a local directory, `s3://bucket/prefix` or `pvc://claim/path` holding "
            "config.json, the weights and the tokenizer files (original ChatGLM layout or a glmtune export)."
        ),
    )
    family: Family | None = Field(
        None,
        description=(
            "Model family: `v1` (ChatGLM-6B), `v2` (ChatGLM2-6B), `v3` (ChatGLM3-6B), `glm4` (GLM-4-9B, THUDM's "
            "remote-code layout or the `-hf` GlmForCausalLM one). Detected from config.json when absent; "
            "required with `create`."
        ),
    )
    dtype: Dtype | None = Field(
        None,
        description=(
            "Data type of the loaded base weights. Default: float32 for `full` and `freeze` (the trained base "
            "weights are the master weights; autocast computes in `training.precision`), else follows "
            "`training.precision` (fp32 → float32, fp16 → float16, bf16 → bfloat16)."
        ),
    )
    quantization: QuantizationSpec | None = Field(
        None, description="Quantize the base weights at load time (absent: no quantization)."
    )
    create: CreateSpec | None = Field(
        None, description="Create a random model and tokenizer instead of loading `uri` (needs `family`)."
    )

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> ModelSpec:
        enforce(self, "spec.model", info)
        return self
