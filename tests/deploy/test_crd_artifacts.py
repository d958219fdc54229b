"""The committed CRD files equal `glmtune crd`, and the CRD is one a real API server accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from testkit import REPO_ROOT

from glmtune.crd import crd_yaml

CRD_FILES = [REPO_ROOT / "charts/glmtune/crds/glmfinetunes.yaml", REPO_ROOT / "manifests/crd.yaml"]
REGENERATE = "scripts/render_manifests.sh (or: glmtune crd --out FILE)"

# JSONSchemaProps fields an apiextensions.k8s.io/v1 structural schema may not use at all.
FORBIDDEN_KEYS = {
    "$ref",
    "$schema",
    "definitions",
    "dependencies",
    "patternProperties",
    "additionalItems",
    "id",
}
# Fields that may not appear inside anyOf/allOf/oneOf/not (value validations only there).
FORBIDDEN_IN_JUNCTORS = {
    "type",
    "description",
    "default",
    "additionalProperties",
    "nullable",
    "properties",
    "items",
}


def _crd() -> dict[str, Any]:
    return yaml.safe_load(crd_yaml())


def _nodes(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below `node` (properties, items, additionalProperties), with its path."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def structural_violations(root: dict[str, Any]) -> list[str]:
    """Where a schema breaks Kubernetes' structural-schema rules (empty when the API server would take it)."""
    problems = []
    for path, node in _nodes(root, "openAPIV3Schema"):
        exempt = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        if not node.get("type") and not exempt:
            problems.append(f"{path}: no type")
        problems += [f"{path}: forbidden keyword {key}" for key in FORBIDDEN_KEYS & node.keys()]
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false")
        if node.get("uniqueItems") is True:
            problems.append(f"{path}: uniqueItems: true")
        if node.get("x-kubernetes-preserve-unknown-fields") is False:
            problems.append(f"{path}: x-kubernetes-preserve-unknown-fields: false")
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and not isinstance(node[key], bool):
                problems.append(f"{path}: {key} must be a boolean in OpenAPI v3.0")
        for junctor in ("anyOf", "allOf", "oneOf"):
            for branch in node.get(junctor, []):
                int_or_string = node.get("x-kubernetes-int-or-string") and branch in (
                    {"type": "integer"},
                    {"type": "string"},
                )
                if not int_or_string and FORBIDDEN_IN_JUNCTORS & branch.keys():
                    problems.append(
                        f"{path}: {junctor} branch sets {sorted(FORBIDDEN_IN_JUNCTORS & branch.keys())}"
                    )
        if "default" in node:
            try:
                jsonschema.Draft4Validator(node).validate(node["default"])
            except jsonschema.ValidationError as exc:
                problems.append(f"{path}: default {node['default']!r} fails its own schema: {exc.message}")
    metadata = root["properties"].get("metadata", {})
    if set(metadata.get("properties", {})) - {"name", "generateName"}:
        problems.append("openAPIV3Schema.metadata: only name and generateName may be constrained")
    return problems


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_committed_crd_equals_the_one_generated_from_the_spec_model(path: Path) -> None:
    assert path.read_text(encoding="utf-8") == crd_yaml(), f"{path} is stale: regenerate it with {REGENERATE}"


def test_crd_validates_as_a_kubernetes_object() -> None:
    try:
        kubernetes_validate.validate(_crd(), "1.33.0", strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{exc.message} at {list(exc.path)}")


def test_crd_schema_is_structural() -> None:
    (version,) = _crd()["spec"]["versions"]
    assert structural_violations(version["schema"]["openAPIV3Schema"]) == []


def test_structural_check_catches_what_the_api_server_rejects() -> None:
    schema = {
        "type": "object",
        "properties": {
            "untyped": {"description": "no type"},
            "list": {"type": "array"},
            "union": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "count": {"type": "integer", "minimum": 1, "default": 0},
            "ref": {"type": "object", "$ref": "#/definitions/x"},
        },
    }
    problems = "\n".join(structural_violations(schema))
    for expected in ("untyped: no type", "list: array without items", "union: anyOf branch", "count: default 0",
                     "ref: forbidden keyword $ref"):  # fmt: skip
        assert expected in problems


def test_crd_serves_glmfinetune_with_status_short_name_and_printer_columns() -> None:
    spec = _crd()["spec"]
    assert spec["group"] == "glmtune.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "GLMFineTune" and "glmft" in spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column["jsonPath"] for column in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Method"] == ".spec.method.name"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert any(path.startswith(".status.model") for path in columns.values())
