"""Read a GLMFineTune from YAML or a mapping, apply `--set` overrides, and report errors by file:line."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel, to_snake

from glmtune.errors import InvalidInputError
from glmtune.spec.base import SpecFieldError
from glmtune.spec.resource import GLMFineTune

_OBJECT_KEYS = {"apiVersion", "api_version", "kind", "metadata", "spec", "status"}
# Fields that existed once: what to do instead, so an old spec file fails with a way forward.
_REMOVED_FIELDS = {
    "spec.data.mixed": "it was removed because training always draws batches from all sources together; "
    "`glmtune data build --per-file` still writes one record set per file to inspect",
}
Loc = tuple[str | int, ...]


class SpecError(InvalidInputError):
    """An invalid spec; `problems` lists every (where, message) pair, `where` is the first one's."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        first_where, first_message = problems[0]
        extra = "".join(f"\n  {where}: {message}" for where, message in problems[1:])
        super().__init__(first_message + extra, where=first_where)


def _aliases() -> dict[str, str]:
    """Every spec field's Python name → its camelCase alias, to print paths the way users write them."""
    seen: dict[str, str] = {}
    stack: list[type[BaseModel]] = [GLMFineTune]
    visited: set[type[BaseModel]] = set()
    while stack:
        model = stack.pop()
        if model in visited:
            continue
        visited.add(model)
        for name, field in model.model_fields.items():
            seen[name] = field.alias or name
            stack.extend(_models_in(field.annotation))
    return seen


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in getattr(annotation, "__args__", ()) for model in _models_in(arg)]


_ALIASES = _aliases()
_KNOWN_KEYS = sorted(set(_ALIASES.values()))


def format_path(loc: Loc) -> str:
    """`('spec', 'data', 'max_length')` → `spec.data.maxLength`; list indexes as `[i]`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + _ALIASES.get(part, part)
    return text


def _key_candidates(part: str) -> tuple[str, ...]:
    return (part, _ALIASES.get(part, part), to_camel(part), to_snake(part))


class _Document:
    """A parsed YAML document plus its node tree, to turn a field path into a line number."""

    def __init__(self, data: Any, node: yaml.Node | None, source: str) -> None:
        self.data, self.node, self.source = data, node, source

    def line_of(self, loc: Loc) -> int | None:
        """Line of the deepest key along `loc` present in the file (a missing field points at its parent)."""
        node = self.node
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in loc:
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                match = next((kv for kv in node.value if kv[0].value in _key_candidates(part)), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line


def _parse_yaml(text: str, source: str) -> _Document:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise InvalidInputError(f"invalid YAML: {exc.problem or exc}", where=where) from None
    finally:
        loader.dispose()
    _reject_duplicate_keys(node, source)
    return _Document(data, node, source)


def _reject_duplicate_keys(node: yaml.Node | None, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise InvalidInputError(
                        f"duplicate key {key.value!r}", where=f"{source}:{key.start_mark.line + 1}"
                    )
                seen.add(key.value)
            _reject_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_duplicate_keys(item, source)


def _as_object(data: Any, where: str) -> tuple[dict[str, Any], bool]:
    """The document as a full object mapping, and whether it was a bare spec (then wrapped into `spec`)."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            "a GLMFineTune spec must be a mapping (apiVersion/kind/metadata/spec)", where=where
        )
    data = dict(data)
    if _OBJECT_KEYS & set(data):
        return data, False
    return {"spec": data}, True


def _parse_override(text: str) -> tuple[Loc, Any]:
    path, sep, value = text.partition("=")
    parts = [part.strip() for part in path.strip().split(".")]
    if not sep or not path.strip() or any(not part for part in parts):
        raise InvalidInputError(
            "expected --set dotted.path=value (e.g. training.learningRate=1e-4)", where=f"--set {text}"
        )
    if parts[0] == "spec":
        parts = parts[1:]
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"value is not valid YAML: {exc}", where=f"--set {text}") from None
    loc: Loc = ("spec", *(int(part) if part.isdigit() else part for part in parts))
    return loc, parsed


def _apply_override(obj: dict[str, Any], loc: Loc, value: Any, text: str) -> Loc:
    """Set `value` at `loc`, reusing whichever spelling (camel/snake) the document already has; returns the path."""
    node: Any = obj
    written: list[str | int] = []
    for depth, part in enumerate(loc):
        last = depth == len(loc) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise InvalidInputError(
                    f"no list item {part} at {format_path(tuple(written))}", where=f"--set {text}"
                )
            key: str | int = part
        else:
            if not isinstance(node, dict):
                raise InvalidInputError(
                    f"{format_path(tuple(written))} is not a mapping", where=f"--set {text}"
                )
            key = next((k for k in _key_candidates(part) if k in node), _ALIASES.get(part, to_camel(part)))
        written.append(key)
        if last:
            node[key] = value
        else:
            child = node[key] if (isinstance(node, list) or key in node) else None
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict | list):
                raise InvalidInputError(
                    f"{format_path(tuple(written))} is a value, not a mapping with fields",
                    where=f"--set {text}",
                )
            node = child
    return tuple(written)


def _problems(error: Any, locate: Any) -> list[tuple[str, str]]:
    """One pydantic error as (where, message) pairs: a failed rule check may report several fields."""
    loc: Loc = tuple(error["loc"])
    message = error["msg"]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, SpecFieldError):
        pairs = [(cause.loc, str(cause)), *cause.also]
        return [(locate(loc + field), text) for field, text in pairs]
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    elif error["type"] == "extra_forbidden":
        message = f"unknown field {loc[-1]!r}"
        close = difflib.get_close_matches(str(loc[-1]), _KNOWN_KEYS, n=1)
        removed = _REMOVED_FIELDS.get(format_path(loc))
        if removed:
            message += f": {removed}"
        elif close and close[0] != loc[-1]:
            message += f" (did you mean {close[0]!r}?)"
    elif error["type"] == "missing":
        message = "required field is missing"
    return [(locate(loc), message)]


def _validate(obj: dict[str, Any], locate: Any) -> GLMFineTune:
    try:
        return GLMFineTune.model_validate(obj)
    except ValidationError as exc:
        raise SpecError([pair for error in exc.errors() for pair in _problems(error, locate)]) from None


def _build(document: _Document, overrides: Sequence[str], default_name: str | None) -> GLMFineTune:
    obj, bare = _as_object(document.data, f"{document.source}:1")
    overridden: dict[Loc, str] = {}
    for text in overrides:
        loc, value = _parse_override(text)
        overridden[_apply_override(obj, loc, value, text)] = text
    if default_name and not (obj.get("metadata") or {}).get("name"):
        obj["metadata"] = {**(obj.get("metadata") or {}), "name": default_name}

    def locate(loc: Loc) -> str:
        path = format_path(loc)
        for written, text in overridden.items():
            if _same_path(loc[: len(written)], written):
                return f"--set {text} ({path})"
        file_loc = loc[1:] if bare and loc[:1] == ("spec",) else loc
        line = document.line_of(file_loc)
        return f"{document.source}:{line} ({path})" if line else f"{document.source} ({path})"

    return _validate(obj, locate)


def _same_path(left: Loc, right: Loc) -> bool:
    return len(left) == len(right) and all(
        a == b or (isinstance(a, str) and isinstance(b, str) and to_snake(a) == to_snake(b))
        for a, b in zip(left, right, strict=True)
    )


def _name_from_file(path: Path) -> str | None:
    name = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")[:63].strip("-")
    return name or None


def load_spec_file(path: str | Path, overrides: Sequence[str] = ()) -> GLMFineTune:
    """Load a GLMFineTune from a YAML file (full object or bare spec), applying `--set a.b=value` overrides.

    Errors raise `SpecError` (an `InvalidInputError`) whose `where` is ``file:line (spec.path)``.
    `metadata.name` defaults to the file name.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError("spec file not found", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read spec file: {exc}", where=str(path)) from None
    return _build(_parse_yaml(text, str(path)), overrides, _name_from_file(path))


def spec_from_yaml(text: str, source: str = "<yaml>", overrides: Sequence[str] = ()) -> GLMFineTune:
    """Like `load_spec_file` for YAML text (e.g. a ConfigMap); `source` names it in errors."""
    return _build(_parse_yaml(text, source), overrides, None)


def spec_from_mapping(
    data: Mapping[str, Any], source: str = "<mapping>", overrides: Sequence[str] = ()
) -> GLMFineTune:
    """Validate a GLMFineTune given as a mapping (e.g. the body the Kubernetes API returned).

    Errors raise `SpecError` whose `where` is ``source (spec.path)``.
    """
    return _build(_Document(_plain(data), None, source), overrides, None)


def _plain(value: Any) -> Any:
    """Deep copy of a mapping into plain dicts and lists (kopf bodies are read-only views), so overrides can write."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
