"""What the operator reads from S3 (never writes or deletes): export completeness and data listings.

Credentials come from the GLMFineTune's Secret (`spec.s3.secretRef`), else the operator's ambient AWS
credentials; the endpoint from `spec.s3.endpoint`, else GLMTUNE_S3_ENDPOINT. Clients, listing and the
completeness check are `glmtune.storage`'s (one S3 layer for every component). Network and throttling errors
raise `S3Unavailable` so the caller retries with backoff; a missing or inconsistent export is a result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from glmtune import storage
from glmtune.storage import Completeness, S3Access, S3Unavailable
from glmtune_operator.datawatch import is_data_key

__all__ = ["Completeness", "S3Access", "S3Unavailable", "access_for", "list_data_versions", "verify_export"]
# Handler threads must not hang on a slow endpoint: fewer retries and shorter timeouts than a training job's.
_OPERATOR_PATIENCE = {"max_attempts": 3, "connect_timeout": 5.0, "read_timeout": 20.0}


def verify_export(client: Any, uri: str) -> Completeness:
    """Whether `uri` holds a complete export: a manifest (written last) whose files all exist with their sizes."""
    if not storage.is_s3_uri(uri):
        return Completeness(True, None, "pvc:// exports are verified by the servers that load them")
    return storage.check_complete(uri, client)


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
