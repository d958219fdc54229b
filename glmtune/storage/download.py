"""Downloads for glmtune.storage: `fetch` a location into the shared cache once, verified against its manifest.

Each object is streamed to disk in 1 MiB blocks and hashed on the way, so verifying a download against its
manifest needs no second read of the files (a 12 GB export is read once, not twice). Several objects come
down at a time. The cache may be shared (several processes or nodes on one volume): each entry is filled
under an exclusive lock, so concurrent fetchers of one URI download it once and all get the complete folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError
from glmtune.storage.files import atomic_write_json, exclusive, publish_dir
from glmtune.storage.manifest import COMPLETE_MARKER, MANIFEST_NAME, verify_manifest
from glmtune.storage.s3 import (
    ObjectInfo,
    client_error,
    is_s3_uri,
    list_objects,
    parse_s3_uri,
    relative_key,
    s3_client,
)

_BLOCK = 1 << 20
DOWNLOAD_WORKERS = 4


def default_cache_dir() -> Path:
    """Where downloads are kept: $GLMTUNE_CACHE, else ~/.cache/glmtune."""
    return Path(os.environ.get("GLMTUNE_CACHE") or Path.home() / ".cache" / "glmtune")


def _download_object(client: Any, obj: ObjectInfo, dest: Path) -> tuple[int, str]:
    """Stream one object to `dest` (through a temporary name); returns its (size, sha256)."""
    from botocore.exceptions import BotoCoreError, ClientError

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    digest, size = hashlib.sha256(), 0
    try:
        body = client.get_object(Bucket=obj.bucket, Key=obj.key)["Body"]
        with open(tmp, "wb") as handle:
            for block in body.iter_chunks(_BLOCK):
                digest.update(block)
                handle.write(block)
                size += len(block)
    except (ClientError, BotoCoreError) as exc:
        tmp.unlink(missing_ok=True)
        raise client_error(exc, obj.uri) from None
    os.replace(tmp, dest)
    return size, digest.hexdigest()


def download_prefix(uri: str, local_dir: str | os.PathLike, digests: dict[str, dict[str, Any]] | None = None) -> Path:
    """Copy every object under `uri` into `local_dir` (keys relative to the prefix); returns `local_dir`.

    `digests`, when given, receives {relative path: {"size", "sha256"}} of what was written."""
    _bucket, prefix = parse_s3_uri(uri)
    objects = list_objects(uri)
    if not objects:
        raise InvalidInputError("no objects under this S3 prefix", where=uri)
    target = Path(local_dir)
    client = s3_client()
    rels = [relative_key(obj.key, prefix) for obj in objects]
    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        results = list(pool.map(lambda pair: _download_object(client, pair[0], target / pair[1]),
                                zip(objects, rels, strict=True)))
    if digests is not None:
        digests.update({rel: {"size": size, "sha256": sha} for rel, (size, sha) in zip(rels, results, strict=True)})
    return target


def _listing_fingerprint(objects: list[ObjectInfo]) -> str:
    text = "\n".join(f"{o.key}\t{o.size}\t{o.etag}\t{o.version_id}" for o in objects)
    return hashlib.sha256(text.encode()).hexdigest()


def fetch(
    uri_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, require_manifest: bool = False
) -> Path:
    """A local path for a location: local paths pass through; `s3://` is downloaded once into the cache.

    Downloads are verified against `glmtune-manifest.json` when present; with `require_manifest` its absence
    is an error (an unfinished upload). A changed remote listing triggers a fresh download.
    """
    if not is_s3_uri(uri_or_path):
        path = Path(uri_or_path)
        if not path.exists():
            raise InvalidInputError("no such file or directory", where=str(path))
        if require_manifest:
            verify_manifest(path)
        return path
    uri = str(uri_or_path)
    bucket, prefix = parse_s3_uri(uri)
    objects = list_objects(uri)
    if not objects:
        raise InvalidInputError("no objects under this S3 prefix", where=uri)
    single = len(objects) == 1 and objects[0].key == prefix
    if single and require_manifest:
        raise InvalidInputError("names a single object; a manifest describes a prefix (folder)", where=uri)
    has_manifest = any(relative_key(o.key, prefix) == MANIFEST_NAME for o in objects if not single)
    if require_manifest and not has_manifest:
        raise InvalidInputError(
            f"no {MANIFEST_NAME}: the upload is incomplete or was never finished", where=uri
        )
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "s3"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bucket}_{prefix}")[-80:]
    target = cache_root / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{slug}"
    fingerprint = _listing_fingerprint(objects)
    result = target / relative_key(objects[0].key, prefix) if single else target
    if _is_complete(target, fingerprint):
        return result
    cache_root.mkdir(parents=True, exist_ok=True)
    with exclusive(cache_root / f".{target.name}.lock"):
        if _is_complete(target, fingerprint):  # another fetcher finished it while we waited
            return result
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_root))
        try:
            digests: dict[str, dict[str, Any]] = {}
            download_prefix(uri, staging, digests=digests)
            if has_manifest:
                verify_manifest(staging, display=uri, digests=digests)
            atomic_write_json(staging / COMPLETE_MARKER, {"uri": uri, "listing": fingerprint})
            publish_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return result


def _is_complete(target: Path, fingerprint: str) -> bool:
    """True when `target` holds a finished download of the listing `fingerprint`."""
    try:
        return json.loads((target / COMPLETE_MARKER).read_text()).get("listing") == fingerprint
    except (OSError, ValueError):
        return False
