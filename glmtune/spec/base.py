"""Building blocks shared by every spec section: the base model, field-path errors, URI and quantity types."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema
from pydantic.alias_generators import to_camel

API_GROUP = "glmtune.io"
API_VERSION = "v1alpha1"
KIND = "GLMFineTune"

_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<key>.*))?$")
_PVC_URI = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?:/(?P<path>.*))?$")
_SCHEME = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*)://")
# The Kubernetes resource.Quantity grammar, as controller-gen writes it into CRDs.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class SpecFieldError(ValueError):
    """A cross-field rule failed; `loc` is the offending field relative to the model that checked it.

    Pydantic keeps the exception in the error's ``ctx``, so the loader can report the exact field path
    (``spec.method.lora``) instead of the enclosing section. `also` holds further (loc, message) problems
    found by the same check, reported after this one.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str,
                 also: list[tuple[tuple[str | int, ...], str]] | None = None) -> None:
        self.loc = loc
        self.also = list(also or ())
        super().__init__(message)


class SpecModel(BaseModel):
    """Base of every spec section: camelCase in YAML/CRD, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )


def check_storage_uri(value: str, *, s3_only: bool = False) -> str:
    """Validate a storage location: ``s3://bucket/key``, ``pvc://claim/path`` or a local path."""
    if not value or not value.strip():
        raise ValueError("must not be empty")
    scheme = _SCHEME.match(value)
    if scheme is None:
        if s3_only:
            raise ValueError(f"{value!r} must be an s3:// URI (s3://bucket/prefix)")
        return value
    name = scheme.group("scheme")
    if name == "s3":
        if not _S3_URI.match(value):
            raise ValueError(
                f"{value!r} is not a well-formed s3:// URI: expected s3://bucket/key with a bucket name of "
                "3-63 lowercase letters, digits, dots or hyphens"
            )
        return value
    if s3_only:
        raise ValueError(f"{value!r} must be an s3:// URI (s3://bucket/prefix)")
    if name == "pvc":
        if not _PVC_URI.match(value):
            raise ValueError(f"{value!r} is not a well-formed pvc:// URI: expected pvc://claim-name/path")
        return value
    if name == "file":
        return value
    raise ValueError(
        f"unsupported URI scheme {name!r} in {value!r}: use s3://, pvc://, file:// or a local path"
    )


def _storage_uri(value: Any) -> Any:
    return check_storage_uri(value) if isinstance(value, str) else value


def _s3_uri(value: Any) -> Any:
    return check_storage_uri(value, s3_only=True) if isinstance(value, str) else value


def _quantity(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a Kubernetes quantity is a number or a string such as '4', '500m' or '16Gi'")
    if isinstance(value, int | float):
        value = format(value, "g")
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: '4', '500m', '16Gi', '1.5')")
    return value


StorageUri = Annotated[str, BeforeValidator(_storage_uri)]
"""A local path, ``file://`` path, ``s3://bucket/key`` or ``pvc://claim/path``."""

S3Uri = Annotated[str, BeforeValidator(_s3_uri), WithJsonSchema({"type": "string", "pattern": r"^s3://"})]
"""An ``s3://bucket/key`` URI."""

Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity (``4``, ``500m``, ``16Gi``); integers are kept as their string form."""
