"""glmtune.storage against a real S3 endpoint (moto on 127.0.0.1): round trips, checksums, partial uploads."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune import storage
from glmtune.errors import InvalidInputError


def _make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 64)
    (root / "c.json").write_text(json.dumps({"k": [1, 2, 3]}))
    return root


def test_s3_uri_parsing_names_bad_uris() -> None:
    assert storage.is_s3_uri("s3://bucket/x") and not storage.is_s3_uri("/tmp/x")
    assert storage.parse_s3_uri("s3://my-bucket/a/b/") == ("my-bucket", "a/b/")
    assert storage.parse_s3_uri("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3://", "s3://Bad_Bucket/x", "s3://ab/x", "s3://bucket/a/../b", "http://bucket/x"):
        with pytest.raises(InvalidInputError) as info:
            storage.parse_s3_uri(bad)
        assert bad in str(info.value)


def test_upload_then_fetch_round_trips_every_byte(s3_bucket: str, tmp_path: Path) -> None:
    src = _make_folder(tmp_path / "src")
    result = storage.upload_dir(src, f"s3://{s3_bucket}/runs/one")
    assert sorted(result["uploaded"]) == ["a.txt", "c.json", "sub/b.bin"]
    keys = [o.key for o in storage.list_objects(f"s3://{s3_bucket}/runs/one")]
    assert keys == [
        "runs/one/a.txt",
        "runs/one/c.json",
        "runs/one/glmtune-manifest.json",
        "runs/one/sub/b.bin",
    ]
    local = storage.fetch(f"s3://{s3_bucket}/runs/one", require_manifest=True)
    for rel in ("a.txt", "c.json", "sub/b.bin"):
        assert (local / rel).read_bytes() == (src / rel).read_bytes()
    assert storage.fetch(f"s3://{s3_bucket}/runs/one") == local  # cached: same folder, no second download


def test_listing_uses_folder_semantics(s3_bucket: str, tmp_path: Path) -> None:
    client = storage.s3_client()
    for key in ("data/x.jsonl", "data/sub/y.jsonl", "data2/z.jsonl"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"{}\n")
    info = storage.list_objects(f"s3://{s3_bucket}/data")
    assert [o.key for o in info] == ["data/sub/y.jsonl", "data/x.jsonl"]
    assert info[0].size == 3 and info[0].etag and info[0].last_modified
    single = storage.fetch(f"s3://{s3_bucket}/data2/z.jsonl")
    assert single.name == "z.jsonl" and single.read_bytes() == b"{}\n"


def test_tampered_object_is_detected_on_fetch(s3_bucket: str, tmp_path: Path) -> None:
    src = _make_folder(tmp_path / "src")
    storage.upload_dir(src, f"s3://{s3_bucket}/m")
    storage.s3_client().put_object(Bucket=s3_bucket, Key="m/a.txt", Body=b"evil\n")
    with pytest.raises(InvalidInputError) as info:
        storage.fetch(f"s3://{s3_bucket}/m", cache_dir=tmp_path / "cache")
    assert f"s3://{s3_bucket}/m/a.txt" in str(info.value) and "checksum" in str(info.value)
    assert not any((tmp_path / "cache").glob("*/a.txt"))  # nothing half-verified left behind as cached


def test_tampered_local_file_is_detected(tmp_path: Path) -> None:
    src = _make_folder(tmp_path / "src")
    storage.write_manifest(src)
    storage.verify_manifest(src)
    (src / "sub" / "b.bin").write_bytes(b"x" * (256 * 64))
    with pytest.raises(InvalidInputError, match="sub/b.bin"):
        storage.verify_manifest(src)


def test_interrupted_upload_is_never_complete_and_retry_finishes(s3_bucket: str, tmp_path: Path) -> None:
    src = _make_folder(tmp_path / "src")
    uri = f"s3://{s3_bucket}/partial"
    manifest = storage.write_manifest(src)
    sha = manifest["files"]["a.txt"]["sha256"]
    # What an upload killed after its first file leaves behind: one object, no manifest.
    storage.s3_client().upload_file(
        str(src / "a.txt"), s3_bucket, "partial/a.txt", ExtraArgs={"Metadata": {"sha256": sha}}
    )
    with pytest.raises(InvalidInputError, match="incomplete"):
        storage.fetch(uri, require_manifest=True)
    result = storage.upload_dir(src, uri)
    assert result["skipped"] == ["a.txt"] and sorted(result["uploaded"]) == ["c.json", "sub/b.bin"]
    local = storage.fetch(uri, require_manifest=True)
    assert (local / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()


def test_missing_prefix_and_local_path_are_named(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=f"s3://{s3_bucket}/nothing"):
        storage.fetch(f"s3://{s3_bucket}/nothing")
    with pytest.raises(InvalidInputError, match="no-such-dir"):
        storage.fetch(tmp_path / "no-such-dir")
    with pytest.raises(InvalidInputError, match="s3://no-such-bucket-here"):
        storage.list_objects("s3://no-such-bucket-here/x")


_SLOW_FETCH = """
import sys, time
from glmtune import storage
from glmtune.storage import download
real = download.download_prefix
def slow(uri, local_dir, **kwargs):
    with open(sys.argv[2], "a") as log:
        log.write("download\\n")
    time.sleep(1.0)  # both fetchers are past the cache check before the first download ends
    return real(uri, local_dir, **kwargs)
download.download_prefix = slow
print(storage.fetch(sys.argv[1], require_manifest=True))
"""


def test_concurrent_fetchers_share_one_download_and_both_get_the_verified_folder(
    s3_bucket: str, tmp_path: Path
) -> None:
    # Two processes, as two nodes sharing GLMTUNE_CACHE on one volume, fetch the same URI at the same moment.
    src = _make_folder(tmp_path / "src")
    uri = f"s3://{s3_bucket}/model"
    storage.upload_dir(src, uri)
    log = tmp_path / "downloads.log"
    fetchers = [subprocess.Popen([sys.executable, "-c", _SLOW_FETCH, uri, str(log)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(2)]
    results = [fetcher.communicate(timeout=60) for fetcher in fetchers]
    assert [fetcher.returncode for fetcher in fetchers] == [0, 0], [err[-2000:] for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    local = Path(paths.pop())
    storage.verify_manifest(local)
    assert (local / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert log.read_text().splitlines() == ["download"]  # the second waited for the first, then reused it
    assert not [p.name for p in local.parent.iterdir() if p.name.startswith((".fetch-", ".stale-"))]


def test_changed_remote_listing_replaces_the_cached_copy(s3_bucket: str, tmp_path: Path) -> None:
    src = _make_folder(tmp_path / "src")
    uri = f"s3://{s3_bucket}/model"
    storage.upload_dir(src, uri)
    first = storage.fetch(uri, require_manifest=True)
    (src / "a.txt").write_text("beta\n")
    storage.upload_dir(src, uri)
    second = storage.fetch(uri, require_manifest=True)
    assert second == first and (second / "a.txt").read_text() == "beta\n"
    storage.verify_manifest(second)
    assert not [p.name for p in first.parent.iterdir() if p.name.startswith((".fetch-", ".stale-"))]


def test_json_files_read_back_as_objects_or_named_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    storage.atomic_write_json(good, {"a": [1, 2]})
    assert storage.read_json_object(good) == {"a": [1, 2]}
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "a": 1,\n  oops\n}\n')
    with pytest.raises(InvalidInputError, match=r"broken\.json:3: invalid JSON"):
        storage.read_json_object(broken)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match=r"list\.json: expected a JSON object"):
        storage.read_json_object(listing)
    with pytest.raises(InvalidInputError, match=r"^somewhere: run the build first$"):
        storage.read_json_object(tmp_path / "absent.json", "run the build first", where="somewhere")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / storage.MANIFEST_NAME).write_text("{")
    with pytest.raises(InvalidInputError, match=rf"{storage.MANIFEST_NAME}:1: invalid JSON"):
        storage.read_manifest(tmp_path / "copy")


def test_check_complete_reads_the_manifest_and_the_listing_locally_and_in_s3(s3_bucket: str, tmp_path: Path) -> None:
    src = _make_folder(tmp_path / "src")
    assert "glmtune-manifest.json" in storage.check_complete(src).problem
    storage.write_manifest(src)
    uri = f"s3://{s3_bucket}/runs/check"
    storage.upload_dir(src, uri)
    raw = (src / storage.MANIFEST_NAME).read_bytes()
    for where in (src, uri):
        check = storage.check_complete(where)
        assert check.complete and check.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    (src / "a.txt").write_text("longer than before\n")
    assert "a.txt has 19 bytes" in storage.check_complete(src).problem
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").unlink()
    assert storage.check_complete(src).problem == "sub/b.bin is listed in the manifest but missing"
    assert not storage.check_complete(f"s3://{s3_bucket}/runs/none").complete


def test_an_unreachable_endpoint_is_s3_unavailable_and_clients_are_shared_per_access() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    access = storage.S3Access(endpoint=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s",
                              max_attempts=1, connect_timeout=1.0, read_timeout=1.0)
    client = storage.s3_client(access)
    assert storage.s3_client(storage.S3Access(**vars(access))) is client
    with pytest.raises(storage.S3Unavailable):
        storage.check_complete("s3://models/run-1", client)
    with pytest.raises(storage.S3Unavailable):
        storage.list_objects("s3://models/run-1", client)


def _version(root: Path, tag: str) -> Path:
    root.mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (root / name).write_text(tag)
    return root


def test_publish_replaces_a_folder_that_readers_never_find_missing_or_partial(tmp_path: Path) -> None:
    import threading

    target = _version(tmp_path / "out", "v0")
    problems: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            for name in ("a.txt", "b.txt"):
                try:
                    if (target / name).read_text() not in {f"v{i}" for i in range(200)}:
                        problems.append(f"{name} empty")
                except FileNotFoundError:
                    problems.append(f"{name} missing")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 200):
            storage.publish_dir(_version(tmp_path / f"staging-{i}", f"v{i}"), target)
    finally:
        done.set()
        reader.join()
    assert not problems, problems[:5]
    assert (target / "a.txt").read_text() == "v199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # every old copy was removed


def test_publish_without_an_atomic_swap_puts_the_old_folder_back_when_the_new_one_cannot_move_in(
        tmp_path: Path, monkeypatch) -> None:
    # An exchange flag the kernel rejects (EINVAL) sends publish_dir down its rename-aside path.
    monkeypatch.setattr(storage.files, "_RENAME_EXCHANGE", 1 << 20)
    target = _version(tmp_path / "out", "old")
    staging = _version(tmp_path / "new", "new")
    real_replace = os.replace

    def failing_replace(src, dst) -> None:
        if Path(src) == staging:
            raise OSError("disk unplugged")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk unplugged"):
        storage.publish_dir(staging, target)
    assert (target / "a.txt").read_text() == "old" and (staging / "a.txt").read_text() == "new"
    monkeypatch.setattr(os, "replace", real_replace)
    storage.publish_dir(staging, target)
    assert (target / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
