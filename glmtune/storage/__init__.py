"""Storage URIs shared by every component: local paths and `s3://bucket/prefix`, with checksummed folders.

A folder travels as files plus `glmtune-manifest.json` (sha256 and size per file), written and uploaded
LAST, so a reader never mistakes a partial copy for a complete one. Torch-free; boto3 is imported lazily.
Uploads resume: finished files are skipped and a cut-off multipart upload continues from the parts S3
already holds (`upload`). Downloads are cached, shared safely between processes and verified while they
are written (`download`). Modules: `s3` (URIs, clients, listings), `files` (atomic local writes),
`manifest`, `upload`, `download`; every name is importable from `glmtune.storage` itself.
"""

from __future__ import annotations

from glmtune.storage.download import default_cache_dir, download_prefix, fetch
from glmtune.storage.files import (
    atomic_write_bytes,
    atomic_write_json,
    exclusive,
    file_sha256,
    publish_dir,
    read_json_object,
)
from glmtune.storage.manifest import (
    COMPLETE_MARKER,
    MANIFEST_NAME,
    Completeness,
    check_complete,
    folder_files,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from glmtune.storage.s3 import (
    ObjectInfo,
    S3Access,
    S3Unavailable,
    is_s3_uri,
    list_objects,
    parse_s3_uri,
    relative_key,
    s3_client,
)
from glmtune.storage.upload import DEFAULT_PART_SIZE, MIN_PART_SIZE, SHA_META, upload_dir, upload_file

__all__ = [
    "COMPLETE_MARKER", "DEFAULT_PART_SIZE", "MANIFEST_NAME", "MIN_PART_SIZE", "SHA_META", "Completeness",
    "ObjectInfo", "S3Access", "S3Unavailable", "atomic_write_bytes", "atomic_write_json", "check_complete",
    "default_cache_dir", "download_prefix", "exclusive", "fetch", "file_sha256", "folder_files", "is_s3_uri",
    "list_objects", "parse_s3_uri", "publish_dir", "read_json_object", "read_manifest", "relative_key",
    "s3_client", "upload_dir", "upload_file", "verify_manifest", "write_manifest",
]
