"""`spec.method`: the tuning method and its settings (one section, matching `name`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from glmtune.spec.base import SpecFieldError, SpecModel

MethodName = Literal["lora", "adalora", "ptv2", "freeze", "full"]
METHOD_SECTIONS: tuple[str, ...] = ("lora", "adalora", "ptv2", "freeze")
"""Methods that have a settings section of the same name (`full` has none)."""


class LoraSpec(SpecModel):
    """LoRA: low-rank adapters on the target linear layers (seed defaults r 8, alpha 32, dropout 0.1)."""

    r: int = Field(8, gt=0, le=4096, description="Rank of the low-rank update.")
    alpha: int = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        ["query_key_value"],
        min_length=1,
        description="Linear layers (by name suffix) that get adapters, e.g. query_key_value, dense, dense_h_to_4h.",
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
    def _ranks(self) -> AdaLoraSpec:
        if self.init_r < self.target_r:
            raise SpecFieldError(("initR",), f"initR ({self.init_r}) must be >= targetR ({self.target_r})")
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

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.freezeFirstLayers) != has(self.trainLastLayers)",
                    "message": "set exactly one of freezeFirstLayers or trainLastLayers",
                }
            ]
        }
    )

    freeze_first_layers: int | None = Field(
        None, ge=0, description="Freeze the embedding and the first N transformer layers; train the rest."
    )
    train_last_layers: int | None = Field(
        None, ge=1, description="Train only the last N transformer layers (and the final norm and head)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> FreezeSpec:
        if (self.freeze_first_layers is None) == (self.train_last_layers is None):
            raise SpecFieldError(
                ("freezeFirstLayers",),
                "set exactly one of freeze.freezeFirstLayers or freeze.trainLastLayers",
            )
        return self


def _section_rules() -> list[dict[str, str]]:
    return [
        {
            "rule": f"!has(self.{name}) || self.name == '{name}'",
            "message": f"{name} settings need name: {name}",
        }
        for name in METHOD_SECTIONS
    ] + [
        {
            "rule": "self.name != 'freeze' || has(self.freeze)",
            "message": "name: freeze needs a freeze section",
        }
    ]


class MethodSpec(SpecModel):
    """The tuning method; only the section named by `name` may be present (defaults fill it when absent)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _section_rules()})

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
    def _sections_match_name(self) -> MethodSpec:
        for section in METHOD_SECTIONS:
            if section != self.name and getattr(self, section) is not None:
                raise SpecFieldError(
                    (section,),
                    f"{section} settings are given but method.name is {self.name!r}: the methods are exclusive; "
                    f"remove method.{section} or set method.name: {section}",
                )
        if self.name == "freeze" and self.freeze is None:
            raise SpecFieldError(
                ("freeze",), "name: freeze needs freeze.freezeFirstLayers or freeze.trainLastLayers"
            )
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
