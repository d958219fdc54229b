"""The GLMFineTune CustomResourceDefinition, generated from the spec model, and the `glmtune crd` command.

Pydantic writes JSON Schema (2020-12, `$ref`s, `anyOf` with null); Kubernetes wants a *structural*
OpenAPI v3 schema (everything inlined, a `type` on every node, no nullable unions). `structural_schema`
converts one into the other and refuses keywords it does not know, so a new pydantic construct cannot slip
into the CRD unconverted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from glmtune import storage
from glmtune.spec import API_GROUP, API_VERSION, KIND, GLMFineTuneSpec, GLMFineTuneStatus
from glmtune.spec.rules import crd_validations

PLURAL = "glmfinetunes"
SINGULAR = "glmfinetune"
SHORT_NAMES = ["glmft"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

# Keywords copied as they are (OpenAPI v3 and Kubernetes extensions understand them the same way).
_KEPT = {
    "type", "description", "enum", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "pattern", "format", "required", "default", "x-kubernetes-validations", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
}  # fmt: skip
# Readable key order in the generated YAML: what a node is first, its children last.
_ORDER = {key: index for index, key in enumerate(
    ["type", "description", "default", "enum", "format", "pattern", "minimum", "exclusiveMinimum", "maximum",
     "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "anyOf", "x-kubernetes-int-or-string",
     "required", "properties", "items", "additionalProperties", "x-kubernetes-preserve-unknown-fields",
     "x-kubernetes-validations"])}  # fmt: skip
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number"}


def structural_schema(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (with its `$defs`) into a Kubernetes structural schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [branch for branch in node["anyOf"] if branch != {"type": "null"}]
        if len(branches) != 1:
            raise ValueError(f"unions other than Optional[X] have no structural form: {node['anyOf']}")
        outer = {key: value for key, value in node.items() if key != "anyOf"}
        # The field's own description/default override the referenced model's.
        return structural_schema({**_resolve(branches[0], defs), **outer}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" or (key == "default" and value is None):
            continue
        if key == "properties":
            out["properties"] = _properties(value, set(node.get("required", ())), defs)
        elif key == "items":
            out["items"] = structural_schema(value, defs)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out["additionalProperties"] = structural_schema(value, defs)
            # False (extra="forbid") is dropped: Kubernetes prunes unknown fields and forbids the keyword
            # next to `properties`.
        elif key == "const":
            out["enum"] = [value]
            out.setdefault("type", _JSON_TYPES[type(value)])
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True
        elif key == "anyOf":
            out["anyOf"] = value  # the int-or-string pair, allowed as is
        elif key in _KEPT:
            out[key] = value
        else:
            raise ValueError(f"JSON-schema keyword {key!r} has no CRD conversion (in {sorted(node)})")
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise ValueError(f"schema node without a type: {node}")
    return dict(sorted(out.items(), key=lambda item: _ORDER.get(item[0], len(_ORDER))))


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    return _resolve({**target, **{key: value for key, value in node.items() if key != "$ref"}}, defs)


def _properties(props: dict[str, Any], required: set[str], defs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, raw in props.items():
        schema = structural_schema(raw, defs)
        optional = any(branch == {"type": "null"} for branch in raw.get("anyOf", ()))
        if (
            schema.get("type") == "object"
            and name not in required
            and not optional
            and "default" not in schema
        ):
            # A section with a default_factory: `{}` lets the API server fill in its fields' defaults.
            schema["default"] = {}
        out[name] = schema
    return out


def _model_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return structural_schema(schema, defs)


def open_api_schema() -> dict[str, Any]:
    """The CRD's `openAPIV3Schema`: spec from `GLMFineTuneSpec`, status from `GLMFineTuneStatus`."""
    status = _model_schema(GLMFineTuneStatus)
    # Not pruned, so status keys written by another operator version survive an operator upgrade or rollback.
    # (kopf keeps its handler progress in annotations, see glmtune_operator.handlers.configure, not here.)
    status["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "type": "object",
        "description": "A fine-tuning job for a ChatGLM-family model, and the server that serves its result.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "Always glmtune.io/v1alpha1."},
            "kind": {"type": "string", "description": "Always GLMFineTune."},
            "metadata": {"type": "object"},
            "spec": _model_schema(GLMFineTuneSpec),
            "status": status,
        },
        **crd_validations(""),  # rules that need metadata.name beside the spec
    }


def build_crd() -> dict[str, Any]:
    """The `glmfinetunes.glmtune.io` CustomResourceDefinition as a manifest dict."""
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Method", "type": "string", "jsonPath": ".spec.method.name"},
        {"name": "Run", "type": "integer", "jsonPath": ".status.run"},
        {"name": "Model URI", "type": "string", "jsonPath": ".status.modelUri"},
        {"name": "Candidate", "type": "string", "jsonPath": ".status.candidateUri"},
        {"name": "Canary", "type": "string", "jsonPath": ".status.canaryStage"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "glmtune"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML text (what `glmtune crd` prints)."""
    return yaml.safe_dump(build_crd(), sort_keys=False, allow_unicode=True, width=110)


def _run(args: argparse.Namespace) -> int:
    text = crd_yaml()
    if args.out:
        # 0644: a private file would hide the manifest from other users (kubectl, CI).
        storage.atomic_write_bytes(Path(args.out), text.encode(), mode=0o644)
    else:
        sys.stdout.write(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `glmtune crd [--out FILE]`."""
    parser = subparsers.add_parser(
        "crd",
        help="print the GLMFineTune CustomResourceDefinition (YAML)",
        description="Print (or write) the GLMFineTune CRD generated from the spec model; apply it with kubectl.",
    )
    parser.add_argument("--out", metavar="FILE", help="write the CRD to FILE instead of standard output")
    parser.set_defaults(func=_run)
