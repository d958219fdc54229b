"""Every cross-field rule of the spec, once: the CEL the API server evaluates and the check glmtune runs.

Each `Rule` sits on one section (`self` in its CEL is that section's object, as the API server sees it
after defaulting) and names the field its error points at. The CRD's `x-kubernetes-validations` are
generated from this table (`crd_validations`), and each section's pydantic validator calls `enforce`, which
runs the paired Python predicate and raises with the same field path and message. The predicates are
checked against the CEL by tests/core/spec/test_spec_rules_cel.py on every example, with a real CEL engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationInfo

from glmtune.spec.base import SpecFieldError

VERDICTS_CONTEXT = "glmtune_rule_verdicts"
"""Validation-context key: a dict there collects {rule name: holds} instead of raising (tests compare it to CEL)."""

METHOD_SECTIONS: tuple[str, ...] = ("lora", "adalora", "ptv2", "freeze")
"""Methods that have a settings section of the same name (`full` has none)."""


@dataclass(frozen=True)
class Rule:
    """One rule: `cel` and `holds` say the same thing about the section at `section`; `field` is where it fails."""

    name: str
    section: str  # "spec", "spec.model", ...: the object the rule is attached to ("": the whole resource)
    field: str  # camelCase path below `section` of the field the error points at
    cel: str
    message: str
    holds: Callable[[Any], bool]

    @property
    def path(self) -> str:
        """The failing field's full path, e.g. `spec.method.adalora.tinit`."""
        return f"{self.section}.{self.field}" if self.section else self.field

    def crd(self) -> dict[str, str]:
        """The rule as one `x-kubernetes-validations` entry (fieldPath makes kubectl name the field)."""
        return {"rule": self.cel, "message": self.message, "fieldPath": f".{self.field}"}


def _section_rule(name: str) -> Rule:
    return Rule(
        f"method-{name}-section", "spec.method", name,
        f"!has(self.{name}) || self.name == '{name}'",
        f"{name} settings need method.name: {name}; the methods are exclusive, so remove method.{name} or "
        f"set method.name: {name}",
        lambda method: getattr(method, name) is None or method.name == name,
    )


def _adalora_total(spec: Any) -> int | None:
    adalora = spec.method.adalora
    return (adalora.total_step if adalora is not None else None) or spec.training.max_steps


def _stage(spec: Any) -> int | None:
    return spec.training.deepspeed.stage if spec.training.deepspeed is not None else None


def _expectations(expect: Any) -> int:
    return sum(value is not None for value in (expect.exact, expect.contains, expect.regex))


_ZERO3 = "has(self.training.deepspeed) && self.training.deepspeed.stage == 3"
_ADALORA_SUM = "self.method.adalora.tinit + self.method.adalora.tfinal"
_GENERATION = "self.training.evaluation.generationMetrics"

RULES: tuple[Rule, ...] = (
    Rule("model-source", "spec.model", "uri", "has(self.uri) || has(self.create)",
         "set model.uri (a checkpoint to load) or model.create (a random model)",
         lambda model: model.uri is not None or model.create is not None),
    Rule("model-one-source", "spec.model", "create", "!(has(self.uri) && has(self.create))",
         "model.uri and model.create are exclusive: keep one of them",
         lambda model: model.uri is None or model.create is None),
    Rule("model-create-family", "spec.model", "family", "!has(self.create) || has(self.family)",
         "model.create needs model.family (v1, v2, v3 or glm4)",
         lambda model: model.create is None or model.family is not None),
    Rule("model-create-layout", "spec.model", "create.layout",
         "!has(self.create) || !has(self.create.layout) || self.create.layout == 'remote'"
         " || (has(self.family) && self.family == 'glm4')",
         "model.create.layout hf needs family glm4 (only GLM-4 is published in another layout than THUDM's "
         "remote-code one)",
         lambda model: model.create is None or model.create.layout in (None, "remote") or model.family == "glm4"),
    *(_section_rule(name) for name in METHOD_SECTIONS),
    Rule("method-freeze-needs-section", "spec.method", "freeze", "self.name != 'freeze' || has(self.freeze)",
         "method.name: freeze needs freeze.freezeFirstLayers or freeze.trainLastLayers",
         lambda method: method.name != "freeze" or method.freeze is not None),
    Rule("adalora-ranks", "spec.method.adalora", "initR", "self.initR >= self.targetR",
         "adalora prunes ranks from initR down to targetR: initR must be >= targetR",
         lambda adalora: adalora.init_r >= adalora.target_r),
    Rule("freeze-exactly-one", "spec.method.freeze", "freezeFirstLayers",
         "has(self.freezeFirstLayers) != has(self.trainLastLayers)",
         "set exactly one of freeze.freezeFirstLayers or freeze.trainLastLayers",
         lambda freeze: (freeze.freeze_first_layers is None) != (freeze.train_last_layers is None)),
    Rule("data-watch-needs-s3", "spec.data", "watch", "!self.watch || self.sources.exists(s, s.startsWith('s3://'))",
         "data.watch reacts to S3 drops: add at least one s3:// source",
         lambda data: not data.watch or any(source.startswith("s3://") for source in data.sources)),
    Rule("training-one-warmup", "spec.training", "warmupRatio", "!(has(self.warmupSteps) && has(self.warmupRatio))",
         "set training.warmupSteps or training.warmupRatio, not both",
         lambda training: training.warmup_steps is None or training.warmup_ratio is None),
    Rule("deepspeed-offload-params", "spec.training.deepspeed", "offloadParams",
         "!self.offloadParams || self.stage == 3", "offloadParams needs ZeRO stage 3",
         lambda deepspeed: not deepspeed.offload_params or deepspeed.stage == 3),
    Rule("deepspeed-offload-optimizer", "spec.training.deepspeed", "offloadOptimizer",
         "!self.offloadOptimizer || self.stage > 0", "offloadOptimizer needs ZeRO stage 1, 2 or 3",
         lambda deepspeed: not deepspeed.offload_optimizer or deepspeed.stage > 0),
    Rule("resources-one-gpu-per-process", "spec.resources", "nprocPerNode",
         "!(self.gpusPerNode > 0 && has(self.nprocPerNode) && self.nprocPerNode > self.gpusPerNode)",
         "nprocPerNode exceeds gpusPerNode: each training process needs its own GPU",
         lambda res: not (res.gpus_per_node and res.nproc_per_node and res.nproc_per_node > res.gpus_per_node)),
    Rule("serving-adapter-names-unique", "spec.serving", "adapters",
         "self.adapters.all(a, self.adapters.filter(b, b.name == a.name).size() == 1)",
         "every serving.adapters name is a model name in the API and must be unique",
         lambda serving: len({a.name for a in serving.adapters}) == len(serving.adapters)),
    Rule("serving-adapter-not-model-name", "spec.serving", "adapters",
         "!has(self.modelName) || self.adapters.all(a, a.name != self.modelName)",
         "a serving.adapters name equals serving.modelName: every served model needs its own name",
         lambda serving: serving.model_name is None or all(a.name != serving.model_name for a in serving.adapters)),
    Rule("serving-cuda-needs-gpus", "spec.serving", "device",
         "!self.device.startsWith('cuda') || self.resources.gpus > 0",
         "serving.device asks for CUDA but serving.resources.gpus is 0, so the pod gets no GPU: set "
         "resources.gpus, or device auto or cpu",
         lambda serving: not serving.device.startswith("cuda") or serving.resources.gpus > 0),
    Rule("serving-promotion-needs-serving", "spec.serving", "promotion", "!has(self.promotion) || self.enabled",
         "serving.promotion gates the rollout of a served model; with serving.enabled false nothing is rolled "
         "out: remove serving.promotion or enable serving",
         lambda serving: serving.promotion is None or serving.enabled),
    Rule("golden-prompt-one-expectation", "spec.serving.promotion", "goldenPrompts",
         "self.goldenPrompts.all(p, (has(p.expect.exact) ? 1 : 0) + (has(p.expect.contains) ? 1 : 0)"
         " + (has(p.expect.regex) ? 1 : 0) == 1)",
         "every golden prompt's expect needs exactly one of exact, contains or regex",
         lambda promotion: all(_expectations(p.expect) == 1 for p in promotion.golden_prompts)),
    Rule("golden-prompt-asks-last", "spec.serving.promotion", "goldenPrompts",
         "self.goldenPrompts.all(p, p.messages[size(p.messages) - 1].role == 'user')",
         "the last message of every golden prompt must be the user's (the model answers it)",
         lambda promotion: all(p.messages[-1].role == "user" for p in promotion.golden_prompts)),
    Rule("serving-adapter-not-resource-name", "", "spec.serving.adapters",
         "has(self.spec.serving.modelName) || !has(self.metadata.name)"
         " || self.spec.serving.adapters.all(a, a.name != self.metadata.name)",
         "a serving.adapters name equals metadata.name, the served model's default name: rename the adapter "
         "or set serving.modelName",
         lambda ft: ft.spec.serving.model_name is not None or ft.metadata.name is None
         or all(a.name != ft.metadata.name for a in ft.spec.serving.adapters)),
    Rule("adalora-total-steps", "spec", "method.adalora.totalStep",
         "self.method.name != 'adalora' || (has(self.method.adalora) && has(self.method.adalora.totalStep))"
         " || has(self.training.maxSteps)",
         "adalora schedules its rank budget over a known number of steps: set method.adalora.totalStep or "
         "training.maxSteps",
         lambda spec: spec.method.name != "adalora" or _adalora_total(spec) is not None),
    Rule("adalora-schedule", "spec", "method.adalora.tinit",
         f"self.method.name != 'adalora' || !has(self.method.adalora) || (has(self.method.adalora.totalStep) ? "
         f"{_ADALORA_SUM} < self.method.adalora.totalStep : "
         f"(!has(self.training.maxSteps) || {_ADALORA_SUM} < self.training.maxSteps))",
         "adalora's warm-up and final phases must leave steps to prune ranks in: tinit + tfinal must be below "
         "the total steps (method.adalora.totalStep, else training.maxSteps)",
         lambda spec: spec.method.name != "adalora" or _adalora_total(spec) is None
         or spec.method.adalora.tinit + spec.method.adalora.tfinal < _adalora_total(spec)),
    Rule("zero3-int4", "spec", "training.deepspeed.stage",
         f"!({_ZERO3} && has(self.model.quantization) && self.model.quantization.bits == 4)",
         "DeepSpeed ZeRO-3 cannot shard 4-bit quantized weights: use stage 2 or drop model.quantization",
         lambda spec: not (_stage(spec) == 3 and spec.model.quantization is not None
                           and spec.model.quantization.bits == 4)),
    Rule("ptv2-zero3", "spec", "training.deepspeed.stage", f"!(self.method.name == 'ptv2' && {_ZERO3})",
         "ptv2 prepends prefix key/values to every layer and does not work with DeepSpeed ZeRO-3: use stage 2",
         lambda spec: not (spec.method.name == "ptv2" and _stage(spec) == 3)),
    Rule("bitsandbytes-lora-only", "spec", "model.quantization.backend",
         "!has(self.model.quantization) || self.model.quantization.backend != 'bitsandbytes'"
         " || self.method.name in ['lora', 'adalora']",
         "the bitsandbytes backend only works with method lora or adalora",
         lambda spec: spec.model.quantization is None or spec.model.quantization.backend != "bitsandbytes"
         or spec.method.name in ("lora", "adalora")),
    Rule("quantized-base-frozen", "spec", "model.quantization",
         "!has(self.model.quantization) || !(self.method.name in ['full', 'freeze'])",
         "full and freeze training update base weights, which cannot be quantized: drop model.quantization",
         lambda spec: spec.model.quantization is None or spec.method.name not in ("full", "freeze")),
    Rule("eval-gate-needs-held-out-data", "spec", "serving.promotion.maxEvalLossIncrease",
         "!has(self.serving.promotion) || !has(self.serving.promotion.maxEvalLossIncrease)"
         " || self.data.evalSplit > 0.0",
         "serving.promotion.maxEvalLossIncrease compares held-out eval losses, and with data.evalSplit 0 nothing is "
         "held out (the export records no eval_loss): set data.evalSplit above 0, e.g. 0.05",
         lambda spec: spec.serving.promotion is None or spec.serving.promotion.max_eval_loss_increase is None
         or spec.data.eval_split > 0),
    Rule("adapter-export-needs-adapter", "spec", "output.export",
         "!has(self.output.export) || self.output.export != 'adapter' || !(self.method.name in ['full', 'freeze'])",
         "full and freeze training have no adapter to export: use export: merged",
         lambda spec: spec.output.export != "adapter" or spec.method.name not in ("full", "freeze")),
    Rule("ptv2-export-is-prefix", "spec", "output.export",
         "self.method.name != 'ptv2' || !has(self.output.export) || self.output.export == 'adapter'",
         "ptv2 trains a prefix encoder, which cannot be merged into the weights: it is always exported as "
         "the prefix over model.uri (export: adapter, or leave export out)",
         lambda spec: spec.method.name != "ptv2" or spec.output.export in (None, "adapter")),
    Rule("bits-need-merged-weights", "spec", "output.bits",
         "!has(self.output.bits) || (self.method.name != 'ptv2'"
         " && (!has(self.output.export) || self.output.export == 'merged'))",
         "output.bits re-quantizes merged or full weights; an adapter or ptv2 prefix export has no base "
         "weights to quantize: drop output.bits",
         lambda spec: spec.output.bits is None or (spec.method.name != "ptv2"
                                                   and spec.output.export in (None, "merged"))),
    Rule("adalora-without-deepspeed", "spec", "training.deepspeed",
         "!(self.method.name == 'adalora' && has(self.training.deepspeed))",
         "adalora reallocates ranks from whole gradients, which DeepSpeed ZeRO shards: train adalora without "
         "training.deepspeed",
         lambda spec: not (spec.method.name == "adalora" and spec.training.deepspeed is not None)),
    Rule("generation-metrics-zero3", "spec", "training.evaluation.generationMetrics",
         f"!({_GENERATION} && {_ZERO3})",
         "generation needs whole weights on every rank, which ZeRO-3 shards: use stage 2 or turn "
         "generationMetrics off",
         lambda spec: not (spec.training.evaluation.generation_metrics and _stage(spec) == 3)),
    Rule("generation-metrics-held-out", "spec", "training.evaluation.generationMetrics",
         f"!({_GENERATION} && self.data.evalSplit == 0.0)",
         "generation metrics are computed on held-out samples: set data.evalSplit above 0",
         lambda spec: not (spec.training.evaluation.generation_metrics and spec.data.eval_split == 0)),
    Rule("zero-nodes-share-workdir", "spec", "resources.workdirClaim",
         "!(has(self.training.deepspeed) && self.resources.nodes > 1) || has(self.resources.workdirClaim)",
         "DeepSpeed ZeRO on more than one node needs one work dir shared by every pod: each rank writes its own "
         "optimizer shard and on resume every rank reads all of them. Set resources.workdirClaim to a "
         "ReadWriteMany PersistentVolumeClaim, or train without training.deepspeed (plain DDP works with a "
         "work dir per pod)",
         lambda spec: not (spec.training.deepspeed is not None and spec.resources.nodes > 1)
         or spec.resources.workdir_claim is not None),
)

_BY_NAME = {rule.name: rule for rule in RULES}


def rule(name: str) -> Rule:
    """The rule called `name` (for code that checks one outside the spec, e.g. the trainer's step count)."""
    return _BY_NAME[name]


def crd_validations(section: str) -> dict[str, Any]:
    """`json_schema_extra` for the section's model: its rules as `x-kubernetes-validations`."""
    return {"x-kubernetes-validations": [r.crd() for r in RULES if r.section == section]}


def enforce(model: Any, section: str, info: ValidationInfo) -> None:
    """Raise one `SpecFieldError` listing every rule of `section` that `model` breaks.

    With a dict under `VERDICTS_CONTEXT` in the validation context, record each rule's verdict there instead.
    """
    verdicts = (info.context or {}).get(VERDICTS_CONTEXT)
    broken = []
    for candidate in RULES:
        if candidate.section != section:
            continue
        holds = bool(candidate.holds(model))
        if verdicts is not None:
            verdicts[candidate.name] = holds
        elif not holds:
            broken.append(candidate)
    if broken:
        first, *rest = broken
        raise SpecFieldError(tuple(first.field.split(".")), first.message,
                             also=[(tuple(r.field.split(".")), r.message) for r in rest])
