"""Generate `docs/spec-reference.md` (one table per spec section) from the CRD schema of the spec model.

Run ``python -m glmtune.spec_docs > docs/spec-reference.md`` after changing the spec; a test fails when the
committed file differs from the generated text.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from glmtune.crd import open_api_schema

REGENERATE = "python -m glmtune.spec_docs > docs/spec-reference.md"

_INTRO = f"""\
# GLMFineTune spec reference

<!-- Generated from the spec model (glmtune/spec/); do not edit. Regenerate: {REGENERATE} -->

A `GLMFineTune` is a Kubernetes object (`apiVersion: glmtune.io/v1alpha1`, `kind: GLMFineTune`) and the
config file of `glmtune train` / `glmtune run`; a file may also hold just the `spec` mapping. Names are
camelCase in YAML and snake_case in Python (`spec.training.learning_rate`); the CLI also accepts snake_case
in files, the Kubernetes API only camelCase. Unknown fields are errors. Override any field on the command
line with `--set training.learningRate=1e-4` (the value is parsed as YAML).
`required` fields have no default; absent optional fields mean "off" or "derived" as described.
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _literal(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _type_of(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        text = "quantity (int or string)"
    elif "enum" in schema:
        text = " | ".join(f"`{_literal(value)}`" for value in schema["enum"])
    elif schema.get("type") == "array":
        text = f"list of {_type_of(schema['items'])}"
    elif schema.get("type") == "object" and "additionalProperties" in schema:
        text = f"map of {_type_of(schema['additionalProperties'])}"
    else:
        text = schema.get("type", "object")
        if schema.get("format"):
            text += f" ({schema['format']})"
    bounds = []
    if "minimum" in schema:
        bounds.append(f"{'>' if schema.get('exclusiveMinimum') else '≥'} {schema['minimum']}")
    if "maximum" in schema:
        bounds.append(f"{'<' if schema.get('exclusiveMaximum') else '≤'} {schema['maximum']}")
    if "minItems" in schema:
        bounds.append(f"≥ {schema['minItems']} items")
    if "maxLength" in schema:
        bounds.append(f"≤ {schema['maxLength']} chars")
    return text + (f", {', '.join(bounds)}" if bounds else "")


def _default_of(name: str, schema: dict[str, Any], required: set[str]) -> str:
    if name in required:
        return "**required**"
    if "default" not in schema:
        return ""
    if schema["default"] == {} and schema.get("type") == "object":
        return "(section defaults)"
    return f"`{_literal(schema['default'])}`"


def _sections(path: str, schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every object node with properties under `schema`, depth-first in declaration order."""
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        if child.get("type") == "object" and "properties" in child:
            found += _sections(f"{path}.{name}", child)
        elif child.get("type") == "array" and "properties" in child.get("items", {}):
            found += _sections(f"{path}.{name}[]", child["items"])
    return found


def _table(path: str, schema: dict[str, Any]) -> str:
    required = set(schema.get("required", ()))
    lines = [f"## `{path}`", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, child in schema["properties"].items():
        kind = "section" if child.get("type") == "object" and "properties" in child else _type_of(child)
        lines.append(
            f"| `{path}.{name}` | {_cell(kind)} | {_default_of(name, child, required)} "
            f"| {_cell(child.get('description', ''))} |"
        )
    rules = schema.get("x-kubernetes-validations", ())
    if rules:
        lines += ["", "Rules (checked by `kubectl apply` and by glmtune alike):", ""]
        lines += [f"- `{path}{rule['fieldPath']}`: {_cell(rule['message'])}" for rule in rules]
    return "\n".join(lines) + "\n"


def render_spec_reference() -> str:
    """The full Markdown reference: the intro, then one table per section of `spec` and `status`."""
    schema = open_api_schema()
    root = schema["properties"]
    parts = [_INTRO]
    if schema.get("x-kubernetes-validations"):
        parts.append("\n".join(["Rules on the whole resource:", "",
                                 *(f"- `{rule['fieldPath'].lstrip('.')}`: {_cell(rule['message'])}"
                                   for rule in schema["x-kubernetes-validations"])]) + "\n")
    for top in ("spec", "status"):
        parts += [_table(path, schema) for path, schema in _sections(top, root[top])]
    return "\n".join(parts)


def main() -> int:
    """Print the reference to standard output."""
    sys.stdout.write(render_spec_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
