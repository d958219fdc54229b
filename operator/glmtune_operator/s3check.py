"""What the operator reads from S3 (never writes or deletes): export completeness and data listings.

Credentials come from the GLMFineTune's Secret (`spec.s3.secretRef`), else the operator's ambient AWS
credentials; the endpoint from `spec.s3.endpoint`, else GLMTUNE_S3_ENDPOINT. Clients, listing and the
completeness check are `glmtune.storage`'s (one S3 layer for every component). Network and throttling errors
raise `S3Unavailable` so the caller retries with backoff; a missing or inconsistent export is a result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import (
    EXPORT_FILE,
    KINDS_WITH_BASE,
    MANIFEST_FILE,
    REPORT_FILE,
    ExportInfo,
    parse_export_info,
)
from glmtune.fingerprint import FINGERPRINT_FILE, check_base_match, read_cached_fingerprint
from glmtune.storage import Completeness, S3Access, S3Unavailable
from glmtune_operator.datawatch import is_data_key

__all__ = ["Completeness", "ExportFacts", "S3Access", "S3Unavailable", "access_for", "base_mismatch",
           "export_facts", "list_data_versions", "verify_export"]
# Handler threads must not hang on a slow endpoint: fewer retries and shorter timeouts than a training job's.
_OPERATOR_PATIENCE = {"max_attempts": 3, "connect_timeout": 5.0, "read_timeout": 20.0}


def verify_export(client: Any, uri: str) -> Completeness:
    """Whether `uri` holds a complete export: a manifest (written last) whose files all exist with their sizes."""
    if not storage.is_s3_uri(uri):
        return Completeness(True, None, "pvc:// exports are verified by the servers that load them")
    return storage.check_complete(uri, client)


@dataclass(frozen=True)
class ExportFacts:
    """What the operator reads from a complete export beyond its completeness: the run's held-out metrics
    (None when they cannot be read, with `problem` saying why) and the training report's URI, if any."""

    metrics: dict[str, float] | None
    report_uri: str | None = None
    problem: str = ""
    info: ExportInfo | None = None


def _get_json(client: Any, uri: str, name: str) -> Any:
    """The decoded JSON file `name` of the export at `uri`; None when it does not exist."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = storage.parse_s3_uri(uri)
    key = f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name
    try:
        raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404", "NotFound"):
            return None
        raise S3Unavailable(f"{uri}/{name}: S3 request failed: {exc}") from None
    except BotoCoreError as exc:
        raise S3Unavailable(f"{uri}/{name}: S3 request failed: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidInputError(f"not JSON: {exc}", where=f"{uri.rstrip('/')}/{name}") from None


def export_facts(client: Any, uri: str) -> ExportFacts:
    """The metrics of `uri`'s glmtune-export.json and its report.html URI (pvc:// exports: nothing readable)."""
    if not storage.is_s3_uri(uri):
        return ExportFacts(None, None, f"{uri}: the operator cannot read pvc:// exports")
    base = uri.rstrip("/")
    try:
        manifest = _get_json(client, uri, MANIFEST_FILE) or {}
        files = manifest.get("files") if isinstance(manifest, dict) else None
        report = f"{base}/{REPORT_FILE}" if isinstance(files, dict) and REPORT_FILE in files else None
        data = _get_json(client, uri, EXPORT_FILE)
        if data is None:
            return ExportFacts(None, report, f"{base}/{EXPORT_FILE} is missing")
        info = parse_export_info(data, where=f"{base}/{EXPORT_FILE}")
        return ExportFacts(dict(info.metrics), report, "", info)
    except InvalidInputError as exc:
        return ExportFacts(None, None, str(exc))


def base_mismatch(client: Any, uri: str, info: ExportInfo | None) -> str | None:
    """Why an adapter/prefix export at `uri` must not be served over its base (the base's cached fingerprint,
    `glmtune-fingerprint.json` next to it in S3, differs from the one the export was trained over), else None.

    Only bases the operator can read are checked: an `s3://` base or one bundled inside the export; an unknown
    side (no fingerprint recorded or cached) passes, as `check_base_match` decides; the server checks again."""
    if info is None or info.kind not in KINDS_WITH_BASE or not info.base_fingerprint or not info.base_model:
        return None
    if storage.is_s3_uri(info.base_model):
        base_uri = info.base_model.rstrip("/")
    elif "://" not in info.base_model and not info.base_model.startswith("/"):
        base_uri = f"{uri.rstrip('/')}/{info.base_model.strip('/')}"  # bundled in the export (`base`)
    else:
        return None  # pvc:// or a path on the pods' disks
    try:
        cached = _get_json(client, base_uri, FINGERPRINT_FILE)
        fingerprint = read_cached_fingerprint(cached) if cached is not None else None
        check_base_match(info.base_fingerprint, fingerprint, export_where=f"{uri.rstrip('/')}/{EXPORT_FILE}",
                         base_where=f"{base_uri}/{FINGERPRINT_FILE}")
    except InvalidInputError as exc:
        return str(exc)
    return None


def list_data_versions(client: Any, sources: Sequence[str]) -> dict[str, str]:
    """Data objects under the `s3://` sources → `etag` (a data drop changes this listing)."""
    versions: dict[str, str] = {}
    for source in sources:
        if not storage.is_s3_uri(source):
            continue
        _, prefix = storage.parse_s3_uri(source)
        for item in storage.list_objects(source, client):
            if item.key == prefix or is_data_key(item.key):
                versions[item.uri] = item.etag
    return versions


def access_for(spec_s3: Any, secret_data: Mapping[str, str] | None, default_endpoint: str | None) -> S3Access:
    """The `S3Access` of a GLMFineTune from its `spec.s3` and the decoded Secret data (if it has one)."""
    ref = spec_s3.secret_ref
    return S3Access(
        endpoint=spec_s3.endpoint or default_endpoint,
        region=spec_s3.region,
        access_key_id=(secret_data or {}).get(ref.access_key_id_key) if ref else None,
        secret_access_key=(secret_data or {}).get(ref.secret_access_key_key) if ref else None,
        **_OPERATOR_PATIENCE,
    )
