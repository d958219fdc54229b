"""Storage URIs shared by every component: local paths and `s3://bucket/prefix`, with checksummed folders.

A folder travels as files plus `glmtune-manifest.json` (sha256 and size per file), written and uploaded
LAST, so a reader never mistakes a partial copy for a complete one. Torch-free; boto3 is imported lazily.
The download cache may be shared (several processes or nodes on one volume): each entry is filled under an
exclusive lock, so concurrent fetchers of one URI download it once and all get the complete folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError, InvalidInputError

MANIFEST_NAME = "glmtune-manifest.json"
_COMPLETE_MARKER = ".glmtune-fetched.json"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SHA_META = "sha256"
_MULTIPART_THRESHOLD = 64 * 1024 * 1024


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


@dataclass(frozen=True)
class Completeness:
    """Whether a folder is complete (its manifest, written last, lists files that are all there), what is
    wrong when it is not, and the manifest's sha256 (what a deployment pins)."""

    complete: bool
    manifest_sha256: str | None = None
    problem: str = ""


_CLIENTS: dict[S3Access, Any] = {}
_CLIENTS_LOCK = threading.Lock()
_MISSING_OR_DENIED = ("NoSuchBucket", "NoSuchKey", "404", "NotFound", "AccessDenied", "403", "InvalidAccessKeyId")


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


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _client_error(exc: Exception, uri: str) -> GlmtuneError:
    """Turn a botocore failure into one line naming the URI: a missing or refused object is the caller's
    input error, anything else (network, throttling, server) is S3Unavailable."""
    code = _error_code(exc) or type(exc).__name__
    if code in _MISSING_OR_DENIED:
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
        raise _client_error(exc, uri) from None
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


def _relative_key(key: str, prefix: str) -> str:
    """Path of `key` below `prefix`; a URI naming a single object maps to its base name."""
    if key == prefix:
        return key.rsplit("/", 1)[-1]
    rel = key[len(prefix.rstrip("/")) + 1 :] if prefix else key
    if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise InvalidInputError("object key cannot be mapped to a safe local path", where=f"s3://…/{key}")
    return rel


def download_prefix(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy every object under `uri` into `local_dir` (keys relative to the prefix); returns `local_dir`."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    objects = list_objects(uri)
    if not objects:
        raise InvalidInputError("no objects under this S3 prefix", where=uri)
    target = Path(local_dir)
    client = s3_client()
    for obj in objects:
        dest = target / _relative_key(obj.key, prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            client.download_file(bucket, obj.key, str(tmp), Config=_transfer_config())
        except (ClientError, BotoCoreError) as exc:
            raise _client_error(exc, obj.uri) from None
        os.replace(tmp, dest)
    return target


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD, multipart_chunksize=_MULTIPART_THRESHOLD)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write `data` under a temporary name in the same folder, then rename: readers see all or nothing.

    `mode` sets the file's permissions (the temporary file starts as 0600, private to this user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `staging` at `target` (same filesystem), replacing what is there.

    `target` holds the old folder or the new one, each complete, at every instant: an existing one is swapped
    with `staging` in one atomic rename (Linux renameat2 RENAME_EXCHANGE) and deleted after; where the kernel
    cannot swap, it is renamed aside, the new one renamed in, and the old one put back if that fails.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    aside = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the kernel or filesystem cannot (the caller falls back)."""
    import ctypes
    import errno

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_bytes` of pretty-printed JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode())


def read_json_object(path: str | os.PathLike, missing: str = "file is missing", where: str | None = None) -> dict:
    """The JSON object stored in `path`. InvalidInputError when the file is missing (`missing`, at `where`, by
    default the file), is not JSON (naming file:line), cannot be read, or holds something else than an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(missing, where=where or str(path)) from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"unreadable JSON: {exc}", where=str(path)) from None
    if not isinstance(data, dict):
        raise InvalidInputError("expected a JSON object", where=str(path))
    return data


def _folder_files(local_dir: Path) -> list[Path]:
    """Regular files under `local_dir` except the manifest and fetch markers, sorted."""
    skip = {MANIFEST_NAME, _COMPLETE_MARKER}
    return sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name not in skip)


def write_manifest(local_dir: str | os.PathLike) -> dict:
    """Checksum every file of `local_dir` into `glmtune-manifest.json` (atomically) and return it."""
    root = Path(local_dir)
    if not root.is_dir():
        raise InvalidInputError("not a directory", where=str(root))
    files = {
        p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in _folder_files(root)
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


def verify_manifest(local_dir: str | os.PathLike, display: str | None = None) -> dict:
    """Check every file listed in the manifest (size, then sha256); raise naming the first bad file.

    `display` replaces the local folder in messages (e.g. the `s3://` URI the folder was fetched from).
    """
    root = Path(local_dir)
    label = (display or str(root)).rstrip("/")
    manifest = read_manifest(root)
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise InvalidInputError("file listed in the manifest is missing", where=f"{label}/{rel}")
        if path.stat().st_size != entry.get("size") or file_sha256(path) != entry.get("sha256"):
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
        if _error_code(exc) not in _MISSING_OR_DENIED:
            raise _client_error(exc, str(uri)) from None
        return Completeness(False, None, f"no {MANIFEST_NAME} ({_error_code(exc)}): the copy is incomplete")
    except BotoCoreError as exc:
        raise _client_error(exc, str(uri)) from None
    try:
        sizes = {name: int(entry["size"]) for name, entry in json.loads(raw)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return Completeness(False, None, f"{MANIFEST_NAME} is not a glmtune manifest")
    if local:
        present = {p.relative_to(uri).as_posix(): p.stat().st_size for p in _folder_files(Path(uri))}
    else:
        present = {_relative_key(o.key, prefix): o.size for o in list_objects(str(uri), client) if o.key != prefix}
    for name, size in sorted(sizes.items()):
        if name not in present:
            return Completeness(False, None, f"{name} is listed in the manifest but missing")
        if present[name] != size:
            return Completeness(False, None, f"{name} has {present[name]} bytes, the manifest says {size}")
    return Completeness(True, hashlib.sha256(raw).hexdigest())


def upload_dir(local_dir: str | os.PathLike, uri: str) -> dict:
    """Upload a folder under `uri`, manifest LAST; a retry skips objects already there with the same sha256.

    Returns ``{"uri", "manifest", "uploaded": [...], "skipped": [...]}``.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    root = Path(local_dir)
    bucket, prefix = parse_s3_uri(uri)
    base = prefix.rstrip("/")
    manifest = write_manifest(root)
    client = s3_client()

    def key_of(rel: str) -> str:
        return f"{base}/{rel}" if base else rel

    uploaded, skipped = [], []
    try:
        # A stale manifest would mark the prefix complete while its files are being replaced.
        client.delete_object(Bucket=bucket, Key=key_of(MANIFEST_NAME))
        remote = {o.key: o for o in list_objects(uri)}
        for rel, entry in sorted(manifest["files"].items()):
            key = key_of(rel)
            if key in remote and remote[key].size == entry["size"]:
                head = client.head_object(Bucket=bucket, Key=key)
                if head.get("Metadata", {}).get(_SHA_META) == entry["sha256"]:
                    skipped.append(rel)
                    continue
            client.upload_file(
                str(root / rel),
                bucket,
                key,
                Config=_transfer_config(),
                ExtraArgs={"Metadata": {_SHA_META: entry["sha256"]}},
            )
            uploaded.append(rel)
        client.upload_file(str(root / MANIFEST_NAME), bucket, key_of(MANIFEST_NAME))
    except (ClientError, BotoCoreError) as exc:
        raise _client_error(exc, uri) from None
    return {"uri": uri, "manifest": manifest, "uploaded": uploaded, "skipped": skipped}


def default_cache_dir() -> Path:
    """Where downloads are kept: $GLMTUNE_CACHE, else ~/.cache/glmtune."""
    return Path(os.environ.get("GLMTUNE_CACHE") or Path.home() / ".cache" / "glmtune")


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
    has_manifest = any(_relative_key(o.key, prefix) == MANIFEST_NAME for o in objects if not single)
    if require_manifest and not has_manifest:
        raise InvalidInputError(
            f"no {MANIFEST_NAME}: the upload is incomplete or was never finished", where=uri
        )
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "s3"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bucket}_{prefix}")[-80:]
    target = cache_root / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{slug}"
    fingerprint = _listing_fingerprint(objects)
    result = target / _relative_key(objects[0].key, prefix) if single else target
    if _is_complete(target, fingerprint):
        return result
    cache_root.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_root / f".{target.name}.lock"):
        if _is_complete(target, fingerprint):  # another fetcher finished it while we waited
            return result
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_root))
        try:
            download_prefix(uri, staging)
            if has_manifest:
                verify_manifest(staging, display=uri)
            atomic_write_json(staging / _COMPLETE_MARKER, {"uri": uri, "listing": fingerprint})
            publish_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return result


def _is_complete(target: Path, fingerprint: str) -> bool:
    """True when `target` holds a finished download of the listing `fingerprint`."""
    try:
        return json.loads((target / _COMPLETE_MARKER).read_text()).get("listing") == fingerprint
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (kept, never deleted: deleting a lock file reopens the race)."""
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
