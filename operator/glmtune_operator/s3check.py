"""What the operator reads from S3 (never writes or deletes): export manifests and data listings.

Credentials come from the GLMFineTune's Secret (`spec.s3.secretRef`), else the operator's ambient AWS
credentials; the endpoint from `spec.s3.endpoint`, else GLMTUNE_S3_ENDPOINT. Network and throttling errors
raise `S3Unavailable` so the caller retries with backoff; a missing or inconsistent export is a result.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glmtune.storage import MANIFEST_NAME, is_s3_uri, parse_s3_uri
from glmtune_operator.datawatch import is_data_key

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


class S3Unavailable(Exception):
    """S3 could not answer (network, throttling, server error): retry later."""


@dataclass(frozen=True)
class S3Access:
    """How to reach the S3 endpoint of one GLMFineTune."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None


@dataclass(frozen=True)
class ExportCheck:
    """Result of checking an export: complete or not, the manifest's sha256, what is wrong."""

    complete: bool
    manifest_sha256: str | None = None
    problem: str = ""


class S3Clients:
    """boto3 clients shared across handler threads, one per distinct `S3Access`."""

    def __init__(self) -> None:
        self._clients: dict[S3Access, Any] = {}
        self._lock = threading.Lock()

    def get(self, access: S3Access) -> Any:
        with self._lock:
            if access not in self._clients:
                import boto3
                from botocore.config import Config

                self._clients[access] = boto3.client(
                    "s3", endpoint_url=access.endpoint, region_name=access.region or "us-east-1",
                    aws_access_key_id=access.access_key_id, aws_secret_access_key=access.secret_access_key,
                    config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                                  read_timeout=20),
                )
            return self._clients[access]


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _call(fn: Any, **kwargs: Any) -> Any:
    """Run one S3 call; transport failures become S3Unavailable, client errors propagate."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except ClientError as exc:
        if _code(exc) in _MISSING or _code(exc) in ("AccessDenied", "403", "InvalidAccessKeyId"):
            raise
        raise S3Unavailable(f"S3 request failed: {exc}") from exc
    except BotoCoreError as exc:
        raise S3Unavailable(f"S3 unreachable: {exc}") from exc


def _list(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object at or under `prefix` (folder semantics: `data` covers `data/...`, never `data2`)."""
    folder = prefix.rstrip("/") + "/" if prefix else ""
    found, token = [], None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = _call(client.list_objects_v2, **kwargs)
        found += [item for item in page.get("Contents", [])
                  if not prefix or item["Key"] == prefix or item["Key"].startswith(folder)]
        if not page.get("IsTruncated"):
            return found
        token = page.get("NextContinuationToken")


def verify_export(client: Any, uri: str) -> ExportCheck:
    """Whether `uri` holds a complete export: a manifest (written last) whose files all exist with their sizes."""
    from botocore.exceptions import ClientError

    if not is_s3_uri(uri):
        return ExportCheck(True, None, "pvc:// exports are verified by the servers that load them")
    bucket, prefix = parse_s3_uri(uri)
    base = prefix.rstrip("/")
    try:
        raw = _call(client.get_object, Bucket=bucket, Key=f"{base}/{MANIFEST_NAME}")["Body"].read()
    except ClientError as exc:
        return ExportCheck(False, None, f"no {MANIFEST_NAME} ({_code(exc)}): the export is incomplete")
    try:
        files = json.loads(raw)["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return ExportCheck(False, None, f"{MANIFEST_NAME} is not a glmtune manifest")
    present = {item["Key"][len(base) + 1:]: int(item["Size"]) for item in _list(client, bucket, base)}
    for name, size in sorted(sizes.items()):
        if name not in present:
            return ExportCheck(False, None, f"{name} is listed in the manifest but missing")
        if present[name] != size:
            return ExportCheck(False, None, f"{name} has {present[name]} bytes, the manifest says {size}")
    return ExportCheck(True, hashlib.sha256(raw).hexdigest())


def list_data_versions(client: Any, sources: Sequence[str]) -> dict[str, str]:
    """Data objects under the `s3://` sources → `etag` (a data drop changes this listing)."""
    versions: dict[str, str] = {}
    for source in sources:
        if not is_s3_uri(source):
            continue
        bucket, prefix = parse_s3_uri(source)
        for item in _list(client, bucket, prefix):
            if item["Key"] == prefix or is_data_key(item["Key"]):
                versions[f"s3://{bucket}/{item['Key']}"] = str(item.get("ETag", "")).strip('"')
    return versions


def access_for(spec_s3: Any, secret_data: Mapping[str, str] | None, default_endpoint: str | None) -> S3Access:
    """The `S3Access` of a GLMFineTune from its `spec.s3` and the decoded Secret data (if it has one)."""
    ref = spec_s3.secret_ref
    return S3Access(
        endpoint=spec_s3.endpoint or default_endpoint,
        region=spec_s3.region,
        access_key_id=(secret_data or {}).get(ref.access_key_id_key) if ref else None,
        secret_access_key=(secret_data or {}).get(ref.secret_access_key_key) if ref else None,
    )
