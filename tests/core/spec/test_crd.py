"""The generated CRD is a valid, structural apiextensions/v1 object whose schema agrees with the spec model."""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schema import apply_defaults, to_json_schema
from pydantic import BaseModel

from glmtune import crd
from glmtune.crd import build_crd, crd_yaml
from glmtune.spec import GLMFineTuneSpec, GLMFineTuneStatus, load_spec_file, spec_from_mapping

EXAMPLES = sorted((Path(__file__).parent / "examples").glob("*.yaml"))
# snake_case spellings are a convenience of the CLI loader; the API server only knows camelCase.
CAMEL_CASE_EXAMPLES = [path for path in EXAMPLES if "snake-case" not in path.name]
OPENAPI_KEYWORDS = {
    "type", "description", "default", "enum", "format", "pattern", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "required", "properties", "items",
    "additionalProperties", "anyOf", "nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
}  # fmt: skip


def _schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def structural_violations(node: dict[str, Any], path: str = "") -> list[str]:
    """Kubernetes' structural-schema rules, as far as this generator can break them."""
    problems = [f"{path}: keyword {key!r} not allowed" for key in node if key not in OPENAPI_KEYWORDS]
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if "type" not in node and not int_or_string and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{path}: no type")
    if "anyOf" in node:
        if not int_or_string or node["anyOf"] != [{"type": "integer"}, {"type": "string"}]:
            problems.append(f"{path}: anyOf other than the int-or-string pair")
        if "type" in node:
            problems.append(f"{path}: int-or-string with a type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false")
    if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(
        node["exclusiveMinimum"], bool
    ):
        problems.append(f"{path}: JSON-schema style exclusiveMinimum")
    if (
        node.get("type") == "object"
        and "properties" not in node
        and not (
            "additionalProperties" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or path == ".metadata"
        )
    ):
        problems.append(f"{path}: object without properties")
    for name, child in node.get("properties", {}).items():
        problems += structural_violations(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += structural_violations(node[key], f"{path}[{key}]")
    return problems


def test_crd_identity() -> None:
    crd = build_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "glmfinetunes.glmtune.io"
    assert spec["group"] == "glmtune.io" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "GLMFineTune",
        "listKind": "GLMFineTuneList",
        "plural": "glmfinetunes",
        "singular": "glmfinetune",
        "shortNames": ["glmft"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column["jsonPath"] for column in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Method": ".spec.method.name",
        "Run": ".status.run",
        "Model URI": ".status.modelUri",
        "Candidate": ".status.candidateUri",
        "Canary": ".status.canaryStage",
        "Age": ".metadata.creationTimestamp",
    }


def test_crd_is_a_valid_custom_resource_definition() -> None:
    kubernetes_validate.validate(build_crd(), "1.33.0", strict=True)


def test_schema_is_structural() -> None:
    assert structural_violations(_schema()) == []


def test_structural_checker_catches_violations() -> None:
    assert structural_violations({"type": "object", "properties": {"a": {"$ref": "#/x"}}}) == [
        ".a: keyword '$ref' not allowed",
        ".a: no type",
    ]
    assert structural_violations({"anyOf": [{"type": "string"}, {"type": "null"}]})


def test_status_keeps_unknown_fields_and_declares_known_ones() -> None:
    status = _schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert {"phase", "conditions", "run", "jobName", "modelUri", "modelManifestSha256", "dataVersions", "history",
            "observedGeneration"} <= set(status["properties"])  # fmt: skip


def test_every_default_validates_against_its_own_schema() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        if "default" in node:
            jsonschema.validate(
                node["default"], to_json_schema({k: v for k, v in node.items() if k != "default"})
            )
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(_schema(), "")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_manifests_validate_against_the_crd_schema(path: Path) -> None:
    manifest = load_spec_file(path).to_manifest()
    jsonschema.validate(manifest, to_json_schema(_schema()))


@pytest.mark.parametrize("path", CAMEL_CASE_EXAMPLES, ids=lambda path: path.name)
def test_example_files_as_written_validate_against_the_crd_schema(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    if "spec" not in document:
        document = {"apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "spec": document}
    jsonschema.validate(document, to_json_schema(_schema()))


def test_schema_rejects_what_the_model_rejects() -> None:
    schema = to_json_schema(_schema())
    manifest = load_spec_file(EXAMPLES[0]).to_manifest()
    for path, bad in [
        (("data", "maxLength"), 8),
        (("method", "name"), "qlora"),
        (("resources", "memory"), "lots"),
    ]:
        broken = copy.deepcopy(manifest)
        broken["spec"][path[0]][path[1]] = bad
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def _model_for(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        model = _model_for(arg)
        if model is not None:
            return model
    return None


def _default_pairs(model: type[BaseModel], node: dict[str, Any], path: str):
    for field in model.model_fields.values():
        child = node["properties"][field.alias]
        nested = _model_for(field.annotation)
        if child.get("type") == "array" and nested is not None:
            child = child["items"]
        if nested is not None:
            yield from _default_pairs(nested, child, f"{path}.{field.alias}")
        elif not field.is_required() and field.default_factory is None and field.default is not None:
            yield f"{path}.{field.alias}", field.default, child.get("default")


def test_crd_defaults_equal_the_model_defaults() -> None:
    schema = _schema()["properties"]
    pairs = list(_default_pairs(GLMFineTuneSpec, schema["spec"], "spec"))
    pairs += list(_default_pairs(GLMFineTuneStatus, schema["status"], "status"))
    assert len(pairs) > 70
    mismatched = [(path, model, crd) for path, model, crd in pairs if model != crd]
    assert mismatched == []


def test_api_server_defaulting_matches_the_model() -> None:
    minimal = {
        "apiVersion": "glmtune.io/v1alpha1",
        "kind": "GLMFineTune",
        "metadata": {"name": "demo"},
        "spec": {
            "model": {"uri": "m", "quantization": {"bits": 8}},
            "data": {"sources": ["a.json"]},
            "method": {"name": "lora", "lora": {}},
            "training": {"deepspeed": {}},
            "output": {"uri": "o"},
            "resources": {"tolerations": [{"key": "gpu"}]},
            "s3": {"secretRef": {"name": "creds"}},
        },
    }
    defaulted = apply_defaults(minimal, _schema())

    def assert_subset(server: Any, model: Any, path: str) -> None:
        if isinstance(server, dict):
            for key, value in server.items():
                assert key in model, f"{path}.{key} defaulted by the API server but absent in the model"
                assert_subset(value, model[key], f"{path}.{key}")
        else:
            assert server == model, path

    assert_subset(defaulted["spec"], spec_from_mapping(minimal).to_manifest()["spec"], "spec")


def test_cel_rules_reference_existing_fields() -> None:
    def walk(node: dict[str, Any]) -> None:
        for rule in node.get("x-kubernetes-validations", ()):
            for chain in re.findall(r"self((?:\.\w+)+)", rule["rule"]):
                target = node
                for part in chain.strip(".").split("."):
                    if part in ("startsWith", "exists", "all", "filter", "size"):
                        break
                    if target is node and part == "metadata":
                        break  # CEL sees metadata.name and generateName, which the CRD does not declare
                    assert part in target.get("properties", {}), f"{rule['rule']}: no field {part}"
                    target = target["properties"][part]
        for child in node.get("properties", {}).values():
            walk(child)

    walk(_schema())


def test_cross_field_rules_reach_the_crd() -> None:
    spec = _schema()["properties"]["spec"]
    messages = " ".join(rule["message"] for rule in spec["x-kubernetes-validations"])
    assert "ZeRO-3" in messages and "bitsandbytes" in messages and "adalora" in messages
    rules = " ".join(rule["rule"] for rule in spec["x-kubernetes-validations"])
    assert "self.method.name == 'adalora' && has(self.training.deepspeed)" in rules
    assert rules.count("self.training.evaluation.generationMetrics") >= 2  # with ZeRO-3, without evalSplit
    assert "self.resources.nodes > 1) || has(self.resources.workdirClaim)" in rules
    claim = spec["properties"]["resources"]["properties"]["workdirClaim"]
    assert claim["type"] == "string" and claim["maxLength"] == 253 and "ReadWriteMany" in claim["description"]
    ptv2 = spec["properties"]["method"]["properties"]["ptv2"]["properties"]
    assert "prefixHiddenSize" not in ptv2
    method_rules = [rule["rule"] for rule in spec["properties"]["method"]["x-kubernetes-validations"]]
    assert "!has(self.lora) || self.name == 'lora'" in method_rules


def _run_crd_command(argv: list[str]) -> int:
    """Parse and run `glmtune crd ...` with only this command registered (other components may be absent)."""
    parser = argparse.ArgumentParser(prog="glmtune")
    crd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_crd_command_prints_the_generated_crd(capsys) -> None:
    assert _run_crd_command(["crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == build_crd()


def test_crd_command_writes_a_file(tmp_path) -> None:
    out = tmp_path / "deploy" / "crd.yaml"
    assert _run_crd_command(["crd", "--out", str(out)]) == 0
    assert out.read_text() == crd_yaml()
    assert yaml.safe_load(out.read_text()) == build_crd()
    assert [path.name for path in out.parent.iterdir()] == ["crd.yaml"], "no temporary file left behind"
