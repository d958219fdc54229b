"""S3 locations and listing for glmtune.storage: `s3://bucket/prefix` URIs, clients, errors, object listings."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from glmtune.errors import GlmtuneError, InvalidInputError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class ObjectInfo:
    """One object under an S3 prefix, as listed."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None
    last_modified: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3_uri(uri: str | os.PathLike) -> bool:
    """True for `s3://...` strings (local paths and PathLike objects are never S3)."""
    return isinstance(uri, str) and uri.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key/prefix` into (bucket, key); the key may be empty (whole bucket)."""
    if not is_s3_uri(uri):
        raise InvalidInputError("not an s3:// URI", where=str(uri))
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidInputError(
            f"invalid bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')", where=uri
        )
    if any(part in ("..", ".") for part in key.split("/")):
        raise InvalidInputError("'.' and '..' are not allowed in an S3 key", where=uri)
    return bucket, key


@dataclass(frozen=True)
class S3Access:
    """How to reach one S3 endpoint and how patiently; None fields fall back to the standard AWS environment."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


class S3Unavailable(GlmtuneError):
    """S3 could not answer (network, throttling, server error): worth retrying later."""


_CLIENTS: dict[S3Access, Any] = {}
_CLIENTS_LOCK = threading.Lock()
MISSING_OR_DENIED = ("NoSuchBucket", "NoSuchKey", "404", "NotFound", "AccessDenied", "403", "InvalidAccessKeyId")


def s3_client(access: S3Access | None = None) -> Any:
    """A boto3 S3 client. Without `access`: endpoint from AWS_ENDPOINT_URL (MinIO, moto, ...), credentials the
    standard AWS way, a new client per call (the environment may change). With `access`: one client per
    distinct access, shared across threads (boto3 clients are thread-safe)."""
    if access is None:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _new_client(S3Access(endpoint=os.environ.get("AWS_ENDPOINT_URL") or None, region=region))
    with _CLIENTS_LOCK:
        if access not in _CLIENTS:
            _CLIENTS[access] = _new_client(access)
        return _CLIENTS[access]


def _new_client(access: S3Access) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=access.endpoint, region_name=access.region or "us-east-1",
        aws_access_key_id=access.access_key_id, aws_secret_access_key=access.secret_access_key,
        config=Config(retries={"max_attempts": access.max_attempts, "mode": "standard"},
                      connect_timeout=access.connect_timeout, read_timeout=access.read_timeout),
    )


def error_code(exc: Exception) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


def client_error(exc: Exception, uri: str) -> GlmtuneError:
    """Turn a botocore failure into one line naming the URI: a missing or refused object is the caller's
    input error, anything else (network, throttling, server) is S3Unavailable."""
    code = error_code(exc) or type(exc).__name__
    if code in MISSING_OR_DENIED:
        return InvalidInputError(f"S3 refused the request ({code})", where=uri)
    return S3Unavailable(f"{uri}: S3 request failed: {exc}")


def _in_prefix(key: str, prefix: str) -> bool:
    """Folder semantics: `s3://b/data` covers `data` and `data/...`, never `data2/...`."""
    return not prefix or key == prefix or key.startswith(prefix.rstrip("/") + "/")


def list_objects(uri: str, client: Any = None) -> list[ObjectInfo]:
    """Every object at or under `uri` (folder semantics), sorted by key; folder markers are left out.

    `client` defaults to `s3_client()` (the environment's endpoint and credentials)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    client = client or s3_client()
    found: list[ObjectInfo] = []
    try:
        try:
            pages = client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Versions", []):
                    if item.get("IsLatest"):
                        found.append(_object_info(bucket, item, item.get("VersionId")))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("AccessDenied", "NotImplemented"):
                raise
            found = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found.extend(_object_info(bucket, item, None) for item in page.get("Contents", []))
    except (ClientError, BotoCoreError) as exc:
        raise client_error(exc, uri) from None
    objects = [o for o in found if _in_prefix(o.key, prefix) and not o.key.endswith("/")]
    return sorted(objects, key=lambda o: o.key)


def _object_info(bucket: str, item: dict, version_id: str | None) -> ObjectInfo:
    modified = item.get("LastModified")
    return ObjectInfo(
        bucket=bucket,
        key=item["Key"],
        size=int(item.get("Size", 0)),
        etag=str(item.get("ETag", "")).strip('"'),
        version_id=None if version_id in (None, "null") else version_id,
        last_modified=modified.isoformat() if hasattr(modified, "isoformat") else str(modified),
    )


def relative_key(key: str, prefix: str) -> str:
    """Path of `key` below `prefix`; a URI naming a single object maps to its base name."""
    if key == prefix:
        return key.rsplit("/", 1)[-1]
    rel = key[len(prefix.rstrip("/")) + 1 :] if prefix else key
    if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise InvalidInputError("object key cannot be mapped to a safe local path", where=f"s3://…/{key}")
    return rel
