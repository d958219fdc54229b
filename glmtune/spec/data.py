"""`spec.data`: where the question/answer data comes from and how it becomes token records."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glmtune.spec.base import SpecFieldError, SpecModel, StorageUri, check_storage_uri
from glmtune.spec.rules import crd_validations, enforce

DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
"""File and S3 object names read as data under a directory or prefix (the trainer reads, the operator watches)."""

DataFormat = Literal["auto", "seed", "alpaca", "chat"]
Template = Literal["auto", "v1", "v2", "v3", "glm4"]
Strategy = Literal["truncation", "singlesliding", "doublesliding", "packing"]


class DataSpec(SpecModel):
    """Input files, their format, the chat template and how long samples are cut or packed."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.data"))

    sources: list[str] = Field(
        min_length=1,
        max_length=256,
        description=(
            "Input data: local files, directories or globs (`data/*.jsonl`) and `s3://bucket/prefix` URIs "
            "(every .json/.jsonl object under the prefix)."
        ),
    )
    format: DataFormat = Field(
        "auto",
        description=(
            "Record format: `seed` ({id, paragraph: [{q, a}]}), `alpaca` ({instruction, input, output, "
            "history}), `chat` ({messages: [{role, content}]}); `auto` detects it per file."
        ),
    )
    template: Template = Field(
        "auto", description="Chat template for prompts; `auto` uses the model family's own template."
    )
    strategy: Strategy = Field(
        "truncation",
        description=(
            "How samples longer than `maxLength` are handled: `truncation` (cut the prompt, spill the answer "
            "into extra windows), `singlesliding` / `doublesliding` (sliding windows over the prompt / also "
            "the answer), `packing` (concatenate short samples into full windows)."
        ),
    )
    max_length: int = Field(512, ge=16, le=131072, description="Maximum tokens per training sample.")
    workers: int = Field(1, ge=1, le=256, description="Parallel tokenization processes.")
    shuffle: bool = Field(True, description="Shuffle the records (with `seed`) before training.")
    seed: int = Field(42, ge=0, description="Seed for shuffling and the evaluation split.")
    skip_invalid: bool = Field(
        False,
        description="Skip malformed samples (reported by file:line) instead of failing on the first one.",
    )
    max_invalid_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="With `skipInvalid`, fail anyway when more than this fraction of samples is invalid.",
    )
    cache: StorageUri | None = Field(
        None,
        description=(
            "Where built records are cached and reused (a directory or `s3://` prefix), keyed by a hash of "
            "the data, tokenizer, template, strategy and max length."
        ),
    )
    eval_split: float = Field(
        0.0, ge=0.0, lt=0.5, description="Fraction of samples held out for evaluation (0: no evaluation set)."
    )
    group_by_length: bool = Field(
        False, description="Batch samples of similar length together (less padding, slightly less random)."
    )
    watch: bool = Field(
        False,
        description="On Kubernetes, start a new run when objects under an `s3://` source change (a data drop).",
    )
    watch_interval_seconds: int = Field(
        60, ge=5, le=86400, description="How often the operator polls `s3://` sources when `watch` is on."
    )

    @field_validator("sources")
    @classmethod
    def _sources_are_locations(cls, sources: list[str]) -> list[str]:
        for index, source in enumerate(sources):
            try:
                check_storage_uri(source)
            except ValueError as exc:
                raise SpecFieldError((index,), str(exc)) from None
        return sources

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> DataSpec:
        enforce(self, "spec.data", info)
        return self
