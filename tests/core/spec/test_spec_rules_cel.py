"""The CRD's CEL rules and glmtune's own validator agree on every example, checked with a real CEL engine.

Each rule of `glmtune.spec.rules` is evaluated twice per example: its CEL by the `cel` engine on the object
as the API server holds it (the YAML the user wrote, camelCase, with the CRD's defaults applied and numbers
typed as the schema says), and its Python predicate by the spec validator itself (the validation context
asks it to record verdicts instead of raising). Both must give the same verdict on every rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_schema import as_api_server_object
from pydantic import ValidationError
from spec_cases import CASES, bare

from glmtune.crd import build_crd
from glmtune.spec import RULES, GLMFineTune, SpecError, format_path, spec_from_mapping
from glmtune.spec.rules import VERDICTS_CONTEXT

cel = pytest.importorskip("cel", reason="the CEL engine (common-expression-language, dev extra) is not installed")

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_FILES = [
    *sorted((Path(__file__).parent / "examples").glob("*.yaml")),
    *sorted((REPO / "examples").glob("*.yaml")),
    *(path for path in sorted((REPO / "manifests" / "examples").glob("*.yaml"))
      if yaml.safe_load(path.read_text()).get("kind") == "GLMFineTune"),
]
# Examples at each rule's edge (both sides), beside the files and the invalid cases.
RULE_EXAMPLES = {
    "ptv2_without_export_is_a_prefix_export": bare("method: {name: ptv2}"),
    "ptv2_adapter_export": bare("method: {name: ptv2}", "output: {uri: out, export: adapter}"),
    "ptv2_merged_export": bare("method: {name: ptv2}", "output: {uri: out, export: merged}"),
    "ptv2_requantized": bare("method: {name: ptv2}", "output: {uri: out, bits: 4}"),
    "lora_merged_requantized": bare("output: {uri: out, export: merged, bits: 4}"),
    "lora_requantized_without_export": bare("output: {uri: out, bits: 8}"),
    "full_requantized": bare("method: {name: full}", "output: {uri: out, bits: 8}"),
    "adalora_schedule_fits": bare("method: {name: adalora, adalora: {tinit: 10, tfinal: 10, totalStep: 21}}"),
    "adalora_schedule_just_too_long": bare("method: {name: adalora, adalora: {tinit: 10, tfinal: 11, totalStep: 21}}"),
    "adalora_schedule_against_max_steps": bare("method: {name: adalora, adalora: {tinit: 5}}",
                                               "training: {maxSteps: 5}"),
    "adalora_section_absent_with_max_steps": bare("method: {name: adalora}", "training: {maxSteps: 3}"),
    "adalora_equal_ranks": bare("method: {name: adalora, adalora: {initR: 8, targetR: 8, totalStep: 9}}"),
    "eval_split_as_integer_zero": bare("data: {sources: [a.json], evalSplit: 0}",
                                       "training: {evaluation: {generationMetrics: true}}"),
    "generation_metrics_with_held_out_split": bare("data: {sources: [a.json], evalSplit: 0.1}",
                                                   "training: {evaluation: {generationMetrics: true}}"),
    "zero_on_one_node": bare("training: {deepspeed: {stage: 2}}", "resources: {nodes: 1}"),
    "zero_on_two_nodes_with_claim": bare("training: {deepspeed: {stage: 1}}",
                                         "resources: {nodes: 2, workdirClaim: shared}"),
    "zero0_offloading_optimizer": bare("training: {deepspeed: {stage: 0, offloadOptimizer: true}}"),
    "zero3_offloading_params": bare("method: {name: full}",
                                    "training: {deepspeed: {stage: 3, offloadParams: true}}"),
    "processes_fit_gpus": bare("resources: {gpusPerNode: 2, nprocPerNode: 2}"),
    "serving_cuda_on_a_gpu_pod": bare("serving: {device: 'cuda:0', resources: {gpus: 1}}"),
    "serving_cuda_without_gpus": bare("serving: {device: cuda}"),
    "serving_auto_without_gpus": bare("serving: {device: auto, dtype: auto}"),
    "processes_on_cpu": bare("resources: {gpusPerNode: 0, nprocPerNode: 4}"),
    "bitsandbytes_adalora": bare("model: {uri: m, quantization: {bits: 4, backend: bitsandbytes}}",
                                 "method: {name: adalora}", "training: {maxSteps: 10}"),
    "quantized_freeze": bare("model: {uri: m, quantization: {bits: 8}}",
                             "method: {name: freeze, freeze: {trainLastLayers: 1}}"),
    "freeze_adapter_export": bare("method: {name: freeze, freeze: {freezeFirstLayers: 1}}",
                                  "output: {uri: out, export: adapter}"),
    "watch_with_s3_source": bare("data: {sources: [a.json, 's3://data/drop/'], watch: true}"),
    "warmup_steps_only": bare("training: {warmupSteps: 5}"),
    "serving_adapters": bare("serving:\n  modelName: bot\n  apiKeySecret: {name: bot-key}\n  adapters:\n"
                             "    - {name: support, uri: 's3://models/support'}\n"
                             "    - {name: sales, uri: 'pvc://exports/sales'}"),
    "adapter_named_like_the_resource": "metadata: {name: bot}\nspec:\n  " + "\n  ".join(bare(
        "serving: {adapters: [{name: bot, uri: 's3://models/a'}]}").splitlines()),
    "adapter_named_like_the_resource_with_model_name": "metadata: {name: bot}\nspec:\n  " + "\n  ".join(bare(
        "serving: {modelName: main, adapters: [{name: bot, uri: 's3://models/a'}]}").splitlines()),
    "adalora_settings_under_lora": bare("method: {name: lora, adalora: {totalStep: 10}}"),
    "freeze_settings_under_full": bare("method: {name: full, freeze: {trainLastLayers: 1}}"),
    "created_model": "model: {family: v2, create: {size: tiny}}\ndata: {sources: [a.json]}\noutput: {uri: out}\n",
    "created_model_with_uri": "model: {uri: m, family: v2, create: {}}\ndata: {sources: [a.json]}\noutput: {uri: o}\n",
}


def _examples() -> dict[str, str]:
    examples = {f"file:{path.relative_to(REPO)}": path.read_text() for path in EXAMPLE_FILES}
    examples.update({f"invalid:{name}": text for name, (text, _path) in CASES.items()})
    examples.update({f"edge:{name}": text for name, text in RULE_EXAMPLES.items()})
    return examples


EXAMPLES = _examples()
_SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _camel(value: Any, field_names: bool = True) -> Any:
    """snake_case field names as the API server knows them (camelCase); map keys such as labels stay."""
    if isinstance(value, dict):
        maps = ("labels", "annotations", "nodeSelector")
        return {(format_path((key,)) if field_names else key): _camel(item, format_path((key,)) not in maps)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_camel(item) for item in value]
    return value


def _object(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not ({"apiVersion", "kind", "metadata", "spec"} & set(data)):
        data = {"spec": data}
    data.setdefault("metadata", {})  # an object on the API server always has metadata
    return _camel(data)


def _section(obj: Any, path: str) -> Any:
    for part in path.split(".") if path else ():
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def cel_verdicts(obj: dict[str, Any]) -> dict[str, bool | str]:
    """Each rule's CEL on the API server's view of `obj` (an evaluation error as its text); rules of absent
    sections are not evaluated."""
    server = as_api_server_object(obj, _SCHEMA)
    verdicts: dict[str, bool | str] = {}
    for rule in RULES:
        section = _section(server, rule.section)
        if isinstance(section, dict):
            try:
                verdicts[rule.name] = cel.evaluate(rule.cel, {"self": section})
            except Exception as exc:  # the engine raises KeyError, ValueError, RuntimeError...
                verdicts[rule.name] = f"error: {type(exc).__name__}: {exc}"
    return verdicts


def python_verdicts(obj: dict[str, Any]) -> tuple[dict[str, bool], bool]:
    """Each rule's verdict as the spec validator computes it, and whether validation got through the schema."""
    verdicts: dict[str, bool] = {}
    try:
        GLMFineTune.model_validate(obj, context={VERDICTS_CONTEXT: verdicts})
    except ValidationError:
        return verdicts, False
    return verdicts, True


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_cel_and_python_give_every_rule_the_same_verdict(name: str) -> None:
    obj = _object(EXAMPLES[name])
    by_cel = cel_verdicts(obj)
    by_python, schema_valid = python_verdicts(obj)
    if schema_valid:
        # Python evaluates exactly the sections the API server evaluates (absent optional sections: neither),
        # and no rule fails to evaluate on an object the schema accepts.
        assert set(by_python) == set(by_cel)
        assert {rule: v for rule, v in by_cel.items() if isinstance(v, str)} == {}
    disagree = {rule: (by_cel.get(rule), holds) for rule, holds in by_python.items() if by_cel.get(rule) != holds}
    assert disagree == {}, "rule: (CEL verdict, Python verdict)"


def test_every_rule_is_seen_holding_and_failing() -> None:
    seen: dict[str, set[bool | str]] = {rule.name: set() for rule in RULES}
    for text in EXAMPLES.values():
        obj = _object(text)
        if python_verdicts(obj)[1]:
            for rule, holds in cel_verdicts(obj).items():
                seen[rule].add(holds)
    assert {rule: outcomes for rule, outcomes in seen.items() if outcomes != {True, False}} == {}


def test_rule_verdicts_decide_what_the_loader_accepts() -> None:
    """An example every rule passes loads; one some rules fail is refused at those rules' fields, with their
    messages (a section's failures hide the whole-spec rules, which pydantic then does not run)."""
    for name, text in EXAMPLES.items():
        obj = _object(text)
        if not python_verdicts(obj)[1]:
            continue
        verdicts = cel_verdicts(obj)
        failing = {(f"{name} ({rule.path})", rule.message) for rule in RULES if verdicts.get(rule.name) is False}
        if not failing:
            spec_from_mapping(obj, name)
            continue
        with pytest.raises(SpecError) as raised:
            spec_from_mapping(obj, name)
        assert raised.value.problems and set(raised.value.problems) <= failing, name
