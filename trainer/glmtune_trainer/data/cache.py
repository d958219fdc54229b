"""The build cache: finished builds kept by hash in a local folder or under an `s3://` prefix.

A hit copies (downloads) the records instead of tokenizing again; a miss uploads the new build, its
checksum manifest last (`glmtune.storage.upload_dir`), so a half-uploaded build is never a hit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from glmtune import storage
from glmtune_trainer.data.manifest import commit_build, complete_build


def _cache_location(cache: str, digest: str) -> str:
    return f"{cache.rstrip('/')}/{digest}"


def restore_from_cache(cache: str, digest: str, out: Path, staging: Path) -> dict | None:
    """Copy a finished build with this hash from the cache (local folder or s3:// prefix) into `out`."""
    location = _cache_location(cache, digest)
    if storage.is_s3_uri(location):
        names = {o.key.rsplit("/", 1)[-1] for o in storage.list_objects(location)}
        if storage.MANIFEST_NAME not in names:
            return None
        source = storage.fetch(location, require_manifest=True)
    else:
        source = Path(location)
    manifest = complete_build(source, digest)
    if manifest is None:
        return None
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".glmtune-*"))
    commit_build(staging, out, manifest)
    return manifest


def store_in_cache(out: Path, cache: str, digest: str) -> None:
    location = _cache_location(cache, digest)
    if storage.is_s3_uri(location):
        storage.upload_dir(out, location)
        return
    target = Path(location)
    if complete_build(target, digest) is None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        storage.publish_dir(tmp, target)
