"""What the operator reads from S3, against moto: export completeness and data listings."""

from __future__ import annotations

import hashlib

import pytest
from glmtune_operator import s3check
from local_pods import free_port
from operator_testkit import upload_export

from glmtune import storage


def test_a_complete_export_is_verified_by_its_manifest(s3, new_bucket):
    bucket = new_bucket("models")
    sha = upload_export(s3, f"s3://{bucket}/chat/run-1", {"config.json": b"{}", "model.safetensors": b"x" * 10})
    check = s3check.verify_export(s3, f"s3://{bucket}/chat/run-1")
    assert check.complete and check.manifest_sha256 == sha
    raw = s3.get_object(Bucket=bucket, Key="chat/run-1/glmtune-manifest.json")["Body"].read()
    assert sha == hashlib.sha256(raw).hexdigest()


def test_an_unfinished_or_damaged_export_is_refused(s3, new_bucket):
    bucket = new_bucket("models")
    s3.put_object(Bucket=bucket, Key="chat/run-1/config.json", Body=b"{}")
    missing = s3check.verify_export(s3, f"s3://{bucket}/chat/run-1")
    assert not missing.complete and "glmtune-manifest.json" in missing.problem
    upload_export(s3, f"s3://{bucket}/chat/run-2", {"config.json": b"{}", "model.safetensors": b"x" * 10})
    s3.delete_object(Bucket=bucket, Key="chat/run-2/model.safetensors")
    gone = s3check.verify_export(s3, f"s3://{bucket}/chat/run-2")
    assert not gone.complete and "model.safetensors" in gone.problem
    upload_export(s3, f"s3://{bucket}/chat/run-3", {"config.json": b"{}"})
    s3.put_object(Bucket=bucket, Key="chat/run-3/config.json", Body=b"{ }")
    assert "bytes" in s3check.verify_export(s3, f"s3://{bucket}/chat/run-3").problem


def test_pvc_exports_are_left_to_the_servers():
    check = s3check.verify_export(None, "pvc://models/chat/run-1")
    assert check.complete and check.manifest_sha256 is None


def test_data_listing_covers_data_files_under_the_prefix_only(s3, new_bucket):
    bucket = new_bucket("data")
    for key in ("data/a.json", "data/sub/b.jsonl.gz", "data/readme.md", "data2/c.json"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    listing = s3check.list_data_versions(s3, [f"s3://{bucket}/data", "/local/file.json"])
    assert sorted(listing) == [f"s3://{bucket}/data/a.json", f"s3://{bucket}/data/sub/b.jsonl.gz"]
    s3.put_object(Bucket=bucket, Key="data/a.json", Body=b"new content")
    assert s3check.list_data_versions(s3, [f"s3://{bucket}/data"])[f"s3://{bucket}/data/a.json"] != \
        listing[f"s3://{bucket}/data/a.json"]


def test_an_unreachable_endpoint_is_a_transient_error():
    client = storage.s3_client(s3check.S3Access(endpoint=f"http://127.0.0.1:{free_port()}",
                                                access_key_id="k", secret_access_key="s"))
    with pytest.raises(s3check.S3Unavailable):
        s3check.verify_export(client, "s3://models/chat/run-1")
