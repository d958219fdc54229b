"""How the Kubernetes API reads requests: paths, errors, merge patches, label and field selectors (pure)."""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass
from typing import Any

from kmock import resource

Obj = dict[str, Any]


class ApiError(Exception):
    """An error the API server answers with a `Status` object."""

    def __init__(self, code: int, reason: str, message: str, causes: list[dict] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.causes = code, reason, message, causes or []

    def status(self) -> Obj:
        details = {"causes": self.causes} if self.causes else {}
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": self.code,
                "reason": self.reason, "message": self.message, "details": details}


@dataclass(frozen=True)
class Call:
    """One request to a resource: RBAC-style verb, API group, resource[/subresource], who made it."""

    verb: str
    group: str
    resource: str
    namespace: str | None
    name: str | None
    agent: str


@dataclass(frozen=True)
class Target:
    """What a request path addresses: a collection or an object, maybe a subresource."""

    res: resource
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_target(path: str) -> Target | None:
    """`/api/v1[/namespaces/NS]/PLURAL[/NAME[/SUB]]` or `/apis/G/V/...`; None for discovery paths."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    if len(rest) > 3:
        return None
    rest += [None] * (3 - len(rest))
    return Target(resource(group, version, rest[0]), namespace, rest[1], rest[2])


def merge_patch(target: Any, patch: Any, strategic: bool = False) -> Any:
    """RFC 7386 JSON merge patch; `strategic` also merges lists of named items by name (containers, env)."""
    if strategic and isinstance(patch, list) and isinstance(target, list) and _named(patch) and _named(target):
        merged = {item["name"]: item for item in target}
        for item in patch:
            merged[item["name"]] = merge_patch(merged.get(item["name"]), item, strategic)
        return list(merged.values())
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, strategic)
    return result


def _named(items: list) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector string: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`."""
    for term in _split_terms(selector):
        term = term.strip()
        if not term:
            continue
        if " notin " in term or " in " in term:
            key, op, values = term.replace("(", " ").replace(")", " ").partition(" notin " if " notin " in term
                                                                                  else " in ")
            allowed = {value.strip() for value in values.split(",")}
            if (labels.get(key.strip()) in allowed) != (op.strip() == "in"):
                return False
        elif "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [*terms, current]


def field_matches(selector: str, obj: Obj) -> bool:
    meta = obj.get("metadata", {})
    for term in filter(None, selector.split(",")):
        key, negate, value = term.partition("!=") if "!=" in term else (*term.replace("==", "=").partition("="),)
        actual = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}.get(key)
        if (actual == value) == bool(negate == "!="):
            return False
    return True


def now_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def spec_part(obj: Obj) -> Obj:
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}
