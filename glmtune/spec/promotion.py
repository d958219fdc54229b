"""`serving.promotion`: what a new model must show before it replaces the one serving (eval gate, golden
prompts, canary), checked by the operator between a verified export and the rollout."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glmtune.spec.base import SpecModel
from glmtune.spec.rules import crd_validations, enforce


class GoldenMessage(SpecModel):
    """One chat message of a golden prompt (OpenAI chat format)."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks: system, user or assistant.")
    content: str = Field(max_length=8192, description="The message text.")


class GoldenExpectation(SpecModel):
    """What the answer must be: exactly one of `exact`, `contains` or `regex`."""

    exact: str | None = Field(None, max_length=8192, description="The whole answer, after trimming whitespace.")
    contains: str | None = Field(None, max_length=8192, description="A text the answer must contain.")
    regex: str | None = Field(
        None,
        max_length=1024,
        description="A Python regular expression (`re.search`) the answer must match somewhere.",
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        # The operator compiles it with Python's `re`; a pattern it cannot compile would fail every rollout.
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
        return value

    def problem(self, answer: str) -> str | None:
        """Why `answer` misses the expectation, or None when it meets it."""
        if self.exact is not None and answer.strip() != self.exact.strip():
            return f"expected exactly {self.exact!r}"
        if self.contains is not None and self.contains not in answer:
            return f"expected it to contain {self.contains!r}"
        if self.regex is not None and re.search(self.regex, answer) is None:
            return f"expected a match of /{self.regex}/"
        return None


class GoldenPrompt(SpecModel):
    """A conversation sent to every canary pod (temperature 0) and the answer it must give."""

    name: str | None = Field(
        None, max_length=63, description="Name used in conditions and Events (default: `goldenPrompts[i]`)."
    )
    messages: list[GoldenMessage] = Field(
        min_length=1, max_length=32, description="The conversation; the last message is the user's."
    )
    expect: GoldenExpectation = Field(description="What the answer must be.")
    max_tokens: int = Field(64, ge=1, le=4096, description="Most tokens the answer may have.")


class CanarySpec(SpecModel):
    """A canary Deployment of the new model behind the same Service, watched before it is promoted."""

    replicas: int = Field(
        1, ge=1, le=100, description="Canary pods; they take a share of the Service's traffic by pod count."
    )
    duration_seconds: int = Field(
        300, ge=1, le=86400, description="How long the canary pods are watched after the golden prompts passed."
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Most share of the canary pods' API requests answered with a 5xx status."
    )
    max_p95_latency_ms: int | None = Field(
        None, ge=1, description="Most 95th-percentile request latency of the canary pods' API (absent: no limit)."
    )


class PromotionSpec(SpecModel):
    """Gates between a verified export and its rollout; a model that fails one is not rolled out."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.serving.promotion"))

    golden_prompts: list[GoldenPrompt] = Field(
        [], max_length=32, description="Prompts every canary pod must answer as expected before it is watched."
    )
    max_eval_loss_increase: float | None = Field(
        None,
        ge=0,
        description="Refuse a model whose held-out eval loss exceeds the serving model's by more than this "
        "fraction (0.05: 5%), read from both exports' glmtune-export.json `metrics.eval_loss`. "
        "Absent: no gate.",
    )
    canary: CanarySpec = Field(default_factory=CanarySpec, description="The canary Deployment and its limits.")

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> PromotionSpec:
        enforce(self, "spec.serving.promotion", info)
        return self

    def prompt_name(self, index: int) -> str:
        """How conditions name golden prompt `index`: its `name`, else its path."""
        return self.golden_prompts[index].name or f"goldenPrompts[{index}]"
