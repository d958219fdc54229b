"""Checksum manifests of glmtune.storage: `glmtune-manifest.json` (sha256 and size per file), written LAST.

A folder is complete when its manifest exists and every file it lists is there with its size; a reader that
verifies checksums too (`verify_manifest`) knows the copy is the one that was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError
from glmtune.storage.files import atomic_write_json, file_sha256, read_json_object
from glmtune.storage.s3 import (
    MISSING_OR_DENIED,
    client_error,
    error_code,
    is_s3_uri,
    list_objects,
    parse_s3_uri,
    relative_key,
    s3_client,
)

MANIFEST_NAME = "glmtune-manifest.json"
COMPLETE_MARKER = ".glmtune-fetched.json"


@dataclass(frozen=True)
class Completeness:
    """Whether a folder is complete (its manifest, written last, lists files that are all there), what is
    wrong when it is not, and the manifest's sha256 (what a deployment pins)."""

    complete: bool
    manifest_sha256: str | None = None
    problem: str = ""


def folder_files(local_dir: Path) -> list[Path]:
    """Regular files under `local_dir` except the manifest and fetch markers, sorted."""
    skip = {MANIFEST_NAME, COMPLETE_MARKER}
    return sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name not in skip)


def write_manifest(local_dir: str | os.PathLike) -> dict:
    """Checksum every file of `local_dir` into `glmtune-manifest.json` (atomically) and return it."""
    root = Path(local_dir)
    if not root.is_dir():
        raise InvalidInputError("not a directory", where=str(root))
    files = {
        p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in folder_files(root)
    }
    manifest = {
        "format": "glmtune-manifest/v1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(local_dir: str | os.PathLike) -> dict:
    """The folder's manifest, or InvalidInputError when it is missing or unreadable."""
    path = Path(local_dir) / MANIFEST_NAME
    manifest = read_json_object(path, f"no {MANIFEST_NAME}: the copy is incomplete or was never finished",
                                where=str(local_dir))
    if not isinstance(manifest.get("files"), dict):
        raise InvalidInputError("manifest has no 'files' table", where=str(path))
    return manifest


def verify_manifest(local_dir: str | os.PathLike, display: str | None = None,
                    digests: dict[str, dict[str, Any]] | None = None) -> dict:
    """Check every file listed in the manifest (size, then sha256); raise naming the first bad file.

    `display` replaces the local folder in messages (e.g. the `s3://` URI the folder was fetched from);
    `digests` ({relative path: {"sha256"}}) are checksums taken while the files were written, used instead
    of reading those files again.
    """
    root = Path(local_dir)
    label = (display or str(root)).rstrip("/")
    manifest = read_manifest(root)
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise InvalidInputError("file listed in the manifest is missing", where=f"{label}/{rel}")
        known = (digests or {}).get(rel, {}).get("sha256")
        if path.stat().st_size != entry.get("size") or (known or file_sha256(path)) != entry.get("sha256"):
            raise InvalidInputError(
                "checksum mismatch against the manifest (corrupt or tampered)", where=f"{label}/{rel}"
            )
    return manifest


def check_complete(uri: str | os.PathLike, client: Any = None) -> Completeness:
    """Whether the folder at `uri` (local or s3://) is complete: its manifest exists and every file it lists is
    there with its size (one manifest read and one listing; checksums are left to whoever loads it).
    S3Unavailable when S3 cannot answer now; `client` as in `list_objects`."""
    from botocore.exceptions import BotoCoreError, ClientError

    local = not is_s3_uri(uri)
    try:
        if local:
            raw = (Path(uri) / MANIFEST_NAME).read_bytes()
        else:
            bucket, prefix = parse_s3_uri(str(uri))
            base = prefix.rstrip("/")
            client = client or s3_client()
            raw = client.get_object(Bucket=bucket, Key=f"{base}/{MANIFEST_NAME}" if base else MANIFEST_NAME)["Body"].read()
    except OSError as exc:
        return Completeness(False, None, f"no {MANIFEST_NAME} ({exc.strerror}): the copy is incomplete")
    except ClientError as exc:
        if error_code(exc) not in MISSING_OR_DENIED:
            raise client_error(exc, str(uri)) from None
        return Completeness(False, None, f"no {MANIFEST_NAME} ({error_code(exc)}): the copy is incomplete")
    except BotoCoreError as exc:
        raise client_error(exc, str(uri)) from None
    try:
        sizes = {name: int(entry["size"]) for name, entry in json.loads(raw)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return Completeness(False, None, f"{MANIFEST_NAME} is not a glmtune manifest")
    if local:
        present = {p.relative_to(uri).as_posix(): p.stat().st_size for p in folder_files(Path(uri))}
    else:
        present = {relative_key(o.key, prefix): o.size for o in list_objects(str(uri), client) if o.key != prefix}
    for name, size in sorted(sizes.items()):
        if name not in present:
            return Completeness(False, None, f"{name} is listed in the manifest but missing")
        if present[name] != size:
            return Completeness(False, None, f"{name} has {present[name]} bytes, the manifest says {size}")
    return Completeness(True, hashlib.sha256(raw).hexdigest())
