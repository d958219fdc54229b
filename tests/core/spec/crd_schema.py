"""The CRD schema as the API server uses it: JSON Schema for validation, structural defaulting, typed numbers."""

from __future__ import annotations

import copy
from typing import Any


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (CRD) → JSON Schema, so `jsonschema` can validate objects the way the API server does."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            if value:
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[key] = node[bound]
            continue
        out[key] = (
            {k: to_json_schema(v) for k, v in value.items()} if key == "properties" else to_json_schema(value)
        )
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in out:
            out.pop("minimum" if key == "exclusiveMinimum" else "maximum", None)
    if (
        node.get("type") == "object"
        and "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # the API server prunes (and kubectl rejects) unknown fields
    return out


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """What the API server's structural defaulting does to an object before storing it."""
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for name, child in node["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = apply_defaults(value[name], child)
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(item, node["items"]) for item in value]
    return value


def as_api_server_object(value: Any, node: dict[str, Any]) -> Any:
    """`value` the way CEL rules see it on the API server: schema defaults applied, `number` fields as floats."""
    return _typed_numbers(apply_defaults(value, node), node)


def _typed_numbers(value: Any, node: dict[str, Any]) -> Any:
    if isinstance(value, dict) and "properties" in node:
        return {key: _typed_numbers(item, node["properties"][key]) if key in node["properties"] else item
                for key, item in value.items()}
    if isinstance(value, list) and "items" in node:
        return [_typed_numbers(item, node["items"]) for item in value]
    if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
