"""`spec.method`: the tuning method and its settings (one section, matching `name`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, model_validator

from glmtune.spec.base import SpecModel
from glmtune.spec.rules import METHOD_SECTIONS, crd_validations, enforce

MethodName = Literal["lora", "adalora", "ptv2", "freeze", "full"]
__all__ = ["METHOD_SECTIONS", "AdaLoraSpec", "FreezeSpec", "LoraSpec", "MethodSpec", "PrefixTuningSpec"]


class LoraSpec(SpecModel):
    """LoRA: low-rank adapters on the target linear layers (seed defaults r 8, alpha 32, dropout 0.1)."""

    r: int = Field(8, gt=0, le=4096, description="Rank of the low-rank update.")
    alpha: int = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        ["query_key_value"],
        min_length=1,
        description=(
            "Linear layers (by name suffix) that get adapters, e.g. query_key_value, dense, dense_h_to_4h (ChatGLM's "
            "names for every family; a GLM-4 `-hf` base trains on its exact remote-code copy, so these names apply "
            "to it too)."
        ),
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases are trained: none, all, or only those of adapted layers."
    )
    modules_to_save: list[str] = Field(
        [], description="Extra modules trained in full and saved with the adapter (e.g. lm_head)."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(
        False, description="Rank-stabilized scaling alpha / sqrt(r) instead of alpha / r."
    )


class AdaLoraSpec(SpecModel):
    """AdaLoRA: LoRA whose rank budget is reallocated during training (seed: target 8, init 12, beta 0.85)."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.method.adalora"))

    target_r: int = Field(8, gt=0, description="Average rank per layer at the end of the budget schedule.")
    init_r: int = Field(12, gt=0, description="Initial rank of every adapter.")
    tinit: int = Field(0, ge=0, description="Warm-up steps before rank pruning starts.")
    tfinal: int = Field(0, ge=0, description="Final steps that fine-tune with the budget fixed.")
    delta_t: int = Field(1, ge=1, description="Steps between two budget allocations.")
    beta1: float = Field(0.85, gt=0.0, lt=1.0, description="EMA coefficient of the sensitivity smoothing.")
    beta2: float = Field(
        0.85, gt=0.0, lt=1.0, description="EMA coefficient of the uncertainty quantification."
    )
    orth_reg_weight: float = Field(0.5, ge=0.0, description="Weight of the orthogonality regularization.")
    total_step: int | None = Field(
        None, gt=0, description="Total training steps for the budget schedule; default: `training.maxSteps`."
    )
    alpha: int = Field(32, gt=0, description="Scaling numerator of the updates.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        ["query_key_value"], min_length=1, description="Linear layers (by name suffix) that get adapters."
    )

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> AdaLoraSpec:
        enforce(self, "spec.method.adalora", info)
        return self


class PrefixTuningSpec(SpecModel):
    """P-tuning v2: trained prefix key/values in every layer, base weights frozen."""

    pre_seq_len: int = Field(32, gt=0, le=4096, description="Number of prefix tokens.")
    prefix_projection: bool = Field(
        False,
        description="Encode the prefix through a two-layer MLP (Embedding → Linear → Tanh → Linear) as wide as "
        "the model's hidden size.",
    )


class FreezeSpec(SpecModel):
    """Freeze part of the layers and train the rest in full; set exactly one of the two fields."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.method.freeze"))

    freeze_first_layers: int | None = Field(
        None, ge=0, description="Freeze the embedding and the first N transformer layers; train the rest."
    )
    train_last_layers: int | None = Field(
        None, ge=1, description="Train only the last N transformer layers (and the final norm and head)."
    )

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> FreezeSpec:
        enforce(self, "spec.method.freeze", info)
        return self


class MethodSpec(SpecModel):
    """The tuning method; only the section named by `name` may be present (defaults fill it when absent)."""

    model_config = ConfigDict(json_schema_extra=crd_validations("spec.method"))

    name: MethodName = Field(
        "lora",
        description=(
            "`lora`, `adalora`, `ptv2` (p-tuning v2 prefix), `freeze` (train the unfrozen layers in full) "
            "or `full` (every weight)."
        ),
    )
    lora: LoraSpec | None = Field(None, description="LoRA settings (only with name: lora).")
    adalora: AdaLoraSpec | None = Field(None, description="AdaLoRA settings (only with name: adalora).")
    ptv2: PrefixTuningSpec | None = Field(None, description="P-tuning v2 settings (only with name: ptv2).")
    freeze: FreezeSpec | None = Field(
        None, description="Layer freezing settings (required with name: freeze)."
    )

    @model_validator(mode="after")
    def _sections_match_name(self, info: ValidationInfo) -> MethodSpec:
        enforce(self, "spec.method", info)
        # The chosen method's section defaults when absent (after the rules, which see what the user wrote).
        if self.name == "lora" and self.lora is None:
            self.lora = LoraSpec()
        elif self.name == "adalora" and self.adalora is None:
            self.adalora = AdaLoraSpec()
        elif self.name == "ptv2" and self.ptv2 is None:
            self.ptv2 = PrefixTuningSpec()
        return self

    @property
    def settings(self) -> LoraSpec | AdaLoraSpec | PrefixTuningSpec | FreezeSpec | None:
        """The active method's section (None for `full`)."""
        return getattr(self, self.name, None)
