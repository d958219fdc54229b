"""Resumable folder upload to S3: finished files are skipped, a half-sent file continues from its last part.

Files above one part go up as multipart uploads whose id is kept in a small journal in glmtune's cache
(keyed by the local folder and the URI); a run that was killed and started again lists that upload's parts
and sends only the parts S3 does not already hold with the same MD5, then completes it. A file already
complete under the prefix (same size, same sha256 in its metadata) is not sent at all. The manifest is
uploaded LAST, after every file, so a reader that sees it sees a complete folder. Parts are read from disk
one at a time per worker (memory: `workers` x `part_size`), never the whole file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError
from glmtune.storage.files import atomic_write_json
from glmtune.storage.manifest import MANIFEST_NAME, write_manifest
from glmtune.storage.s3 import client_error, list_objects, parse_s3_uri, s3_client

SHA_META = "sha256"
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest part (all but the last)
DEFAULT_PART_SIZE = 64 * 1024 * 1024
DEFAULT_WORKERS = 4
# Answers to a completion that settle it (anything else, e.g. a timeout or NoSuchUpload on a retry, may
# mean the server finished it without us hearing so).
_DEFINITE = ("InvalidPart", "InvalidPartOrder", "EntityTooSmall", "AccessDenied", "NoSuchBucket", "InvalidRequest")
COMPLETE_WAIT_S = 600.0  # how long a completion that errored may still be finishing on the server


def _part_md5(path: Path, start: int, length: int) -> tuple[bytes, str]:
    """(bytes, hex MD5) of one part of `path`."""
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(length)
    return data, hashlib.md5(data, usedforsecurity=False).hexdigest()


class _Journal:
    """The multipart uploads this folder -> URI pair has in progress: {key: {upload_id, sha256, part_size}}."""

    def __init__(self, root: Path, uri: str) -> None:
        from glmtune.storage.download import default_cache_dir

        ident = hashlib.sha256(f"{root.resolve()}\n{uri}".encode()).hexdigest()[:24]
        self.path = default_cache_dir() / "uploads" / f"{ident}.json"
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}

    def set(self, key: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            self.entries.pop(key, None)
        else:
            self.entries[key] = entry
        if self.entries:
            atomic_write_json(self.path, self.entries)
        else:
            self.path.unlink(missing_ok=True)


def _existing_parts(client: Any, bucket: str, key: str, upload_id: str) -> dict[int, dict[str, Any]] | None:
    """The parts S3 holds for an upload in progress, or None when S3 no longer knows the upload."""
    from botocore.exceptions import ClientError

    parts: dict[int, dict[str, Any]] = {}
    try:
        for page in client.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id):
            for part in page.get("Parts", []):
                parts[int(part["PartNumber"])] = part
    except ClientError as exc:
        if "NoSuchUpload" in str(exc) or "404" in str(exc):
            return None
        raise
    return parts


def upload_file(client: Any, path: Path, bucket: str, key: str, sha256: str, journal: _Journal,
                part_size: int = DEFAULT_PART_SIZE, workers: int = DEFAULT_WORKERS) -> dict[str, int]:
    """Put one file at `key` with its sha256 in the metadata; multipart above `part_size`, resuming an upload
    the journal names. Returns {"parts_sent", "parts_reused"} (a single-request file counts as one part)."""
    size = path.stat().st_size
    if size <= part_size:
        with open(path, "rb") as handle:
            client.put_object(Bucket=bucket, Key=key, Body=handle, Metadata={SHA_META: sha256})
        return {"parts_sent": 1, "parts_reused": 0}
    count = -(-size // part_size)
    known = journal.entries.get(key)
    upload_id, existing = None, None
    if known and known.get("sha256") == sha256 and known.get("part_size") == part_size:
        upload_id = known["upload_id"]
        existing = _existing_parts(client, bucket, key, upload_id)
    if existing is None:
        if known:  # an upload of other bytes (or one S3 dropped): abandon it, it would only cost storage
            _abort_quietly(client, bucket, key, known.get("upload_id"))
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata={SHA_META: sha256})["UploadId"]
        journal.set(key, {"upload_id": upload_id, "sha256": sha256, "part_size": part_size})
        existing = {}

    def send(number: int) -> tuple[dict[str, Any], bool]:
        start = (number - 1) * part_size
        length = min(part_size, size - start)
        held = existing.get(number)
        data, md5 = _part_md5(path, start, length)
        if held is not None and int(held["Size"]) == length and str(held["ETag"]).strip('"') == md5:
            return {"PartNumber": number, "ETag": held["ETag"]}, False
        answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data,
                                    ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode())
        return {"PartNumber": number, "ETag": answer["ETag"]}, True

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = list(pool.map(send, range(1, count + 1)))
    _complete(client, bucket, key, upload_id, [part for part, _sent in done], size, sha256)
    journal.set(key, None)
    sent = sum(1 for _part, was_sent in done if was_sent)
    return {"parts_sent": sent, "parts_reused": count - sent}


def _complete(client: Any, bucket: str, key: str, upload_id: str, parts: list[dict[str, Any]], size: int,
              sha256: str) -> None:
    """Complete a multipart upload. Assembling a big object can outlast the client's read timeout: the
    request then fails (or its retry finds the upload already gone) while S3 finishes it, so a failure is
    settled by looking for the finished object (its size and sha256) before it counts."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        return
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in _DEFINITE:
            raise
        failure: Exception = exc
    except BotoCoreError as exc:  # timeouts, dropped connections: the server may have finished anyway
        failure = exc
    deadline = time.monotonic() + COMPLETE_WAIT_S
    while time.monotonic() < deadline:
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            if int(head["ContentLength"]) == size and head.get("Metadata", {}).get(SHA_META) == sha256:
                return
        except ClientError:
            pass  # not there yet
        time.sleep(2.0)
    raise failure


def _abort_quietly(client: Any, bucket: str, key: str, upload_id: str | None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    if upload_id:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError):
            pass  # already gone: nothing to clean up


def upload_dir(local_dir: str | os.PathLike, uri: str, client: Any = None, part_size: int = DEFAULT_PART_SIZE,
               workers: int = DEFAULT_WORKERS) -> dict:
    """Upload a folder under `uri`, manifest LAST; a retry skips files already there with the same sha256 and
    finishes a file whose upload was cut off from the parts S3 already has.

    Returns ``{"uri", "manifest", "uploaded": [...], "skipped": [...], "parts_sent", "parts_reused"}``.
    `client` defaults to `s3_client()` (the environment's endpoint and credentials).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    if part_size < MIN_PART_SIZE:
        raise InvalidInputError(f"S3 parts are at least {MIN_PART_SIZE} bytes, not {part_size}", where="part_size")
    root = Path(local_dir)
    bucket, prefix = parse_s3_uri(uri)
    base = prefix.rstrip("/")
    manifest = write_manifest(root)
    client = client or s3_client()
    journal = _Journal(root, uri)

    def key_of(rel: str) -> str:
        return f"{base}/{rel}" if base else rel

    uploaded, skipped, parts = [], [], {"parts_sent": 0, "parts_reused": 0}
    try:
        # A stale manifest would mark the prefix complete while its files are being replaced.
        client.delete_object(Bucket=bucket, Key=key_of(MANIFEST_NAME))
        remote = {o.key: o for o in list_objects(uri, client)}
        for rel, entry in sorted(manifest["files"].items()):
            key = key_of(rel)
            if key in remote and remote[key].size == entry["size"]:
                head = client.head_object(Bucket=bucket, Key=key)
                if head.get("Metadata", {}).get(SHA_META) == entry["sha256"]:
                    skipped.append(rel)
                    continue
            counts = upload_file(client, root / rel, bucket, key, entry["sha256"], journal, part_size, workers)
            for name, value in counts.items():
                parts[name] += value
            uploaded.append(rel)
        with open(root / MANIFEST_NAME, "rb") as handle:
            client.put_object(Bucket=bucket, Key=key_of(MANIFEST_NAME), Body=handle)
    except (ClientError, BotoCoreError) as exc:
        raise client_error(exc, uri) from None
    return {"uri": uri, "manifest": manifest, "uploaded": uploaded, "skipped": skipped, **parts}
