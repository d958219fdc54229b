"""Loading exports from S3 (moto's real HTTP server on 127.0.0.1): downloaded once, checked against the
manifest; a tampered object or an upload without its manifest is refused."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest
from glmtune_inference.chat import ChatModel
from glmtune_inference.loading import LoadOptions, load_served_models

from glmtune import storage
from glmtune.errors import InvalidInputError


@pytest.fixture(scope="module")
def bucket(moto_endpoint: str) -> Iterator[str]:
    """One bucket for the module (the exports are large to upload), boto3's environment pointing at moto."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", moto_endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        name = f"models-{uuid.uuid4().hex[:8]}"
        storage.s3_client().create_bucket(Bucket=name)
        yield name


def greedy(model, query):
    return ChatModel(model).chat(query, do_sample=False, max_new_tokens=24)[0]


@pytest.mark.parametrize(("kind", "family"), [("full", "v1"), ("int8", "v2"), ("adapter", "v2"), ("prefix", "v2")])
def test_each_export_kind_loads_from_s3(exports, bucket, tmp_path, trained_qa, kind, family):
    """Adapters and prefixes name their base; here the base is uploaded too and the export points at it."""
    local = exports.get(kind, family)
    uri = f"s3://{bucket}/{kind}-{family}"
    if kind in ("adapter", "prefix"):
        import json
        import shutil

        base_uri = f"s3://{bucket}/base-{family}"
        storage.upload_dir(exports.get("base", family), base_uri)
        local = shutil.copytree(local, tmp_path / kind)
        info = json.loads((local / "glmtune-export.json").read_text())
        info["base_model"] = base_uri
        (local / "glmtune-export.json").write_text(json.dumps(info))
    storage.upload_dir(local, uri)
    models = load_served_models(uri, options=LoadOptions(cache_dir=tmp_path / "cache"))
    (model,) = models.values()
    query, answer = trained_qa[kind][0]
    assert greedy(model, query) == answer
    assert any((tmp_path / "cache").rglob("glmtune-manifest.json"))


def test_a_tampered_object_fails_the_checksum(exports, bucket, tmp_path):
    uri = f"s3://{bucket}/tampered"
    storage.upload_dir(exports.get("full", "v2"), uri)
    bucket_name, key = storage.parse_s3_uri(uri)
    storage.s3_client().put_object(Bucket=bucket_name, Key=f"{key}/config.json", Body=b"{}")
    with pytest.raises(InvalidInputError, match="checksum") as err:
        load_served_models(uri, options=LoadOptions(cache_dir=tmp_path / "cache"))
    assert "config.json" in str(err.value)


def test_an_upload_without_its_manifest_is_refused(exports, bucket, tmp_path):
    uri = f"s3://{bucket}/unfinished"
    storage.upload_dir(exports.get("full", "v2"), uri)
    bucket_name, key = storage.parse_s3_uri(uri)
    storage.s3_client().delete_object(Bucket=bucket_name, Key=f"{key}/glmtune-manifest.json")
    with pytest.raises(InvalidInputError, match="incomplete") as err:
        load_served_models(uri, options=LoadOptions(cache_dir=tmp_path / "cache"))
    assert uri in str(err.value)


def test_an_export_with_its_base_inside_loads_from_s3_alone(exports, bundle_base, bucket, tmp_path, trained_qa,
                                                            monkeypatch):
    """A created base model travels inside the export (`base/`, recorded relative): one URI is enough."""
    import glmtune

    local = bundle_base(exports.get("prefix_int4", "v2"), exports.get("base", "v2"), tmp_path / "bundled")
    uri = f"s3://{bucket}/bundled-prefix"
    storage.upload_dir(local, uri)
    shutil.rmtree(local)  # only the S3 copy is left
    (model,) = load_served_models(uri, options=LoadOptions(cache_dir=tmp_path / "cache")).values()
    query, answer = trained_qa["prefix_int4"][0]
    assert greedy(model, query) == answer
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache2"))
    assert glmtune.load_model(uri).config.quantization_bit == 4


def test_inspect_reads_only_the_description_of_an_s3_export(exports, bucket):
    from glmtune.export_inspect import describe

    uri = f"s3://{bucket}/inspect-prefix"
    storage.upload_dir(exports.get("prefix_int4", "v2"), uri)
    data = describe(uri)
    assert (data["kind"], data["quantization_bit"], data["complete"]) == ("prefix", 4, True)
    assert "prefix_encoder.safetensors" in data["files"]


def test_an_adapter_on_s3_refuses_an_s3_base_it_was_not_trained_over(exports, bucket, tmp_path):
    """Both on S3: the fingerprint of the downloaded base is checked (from its verified manifest's digests)."""
    import json

    from glmtune.fingerprint import base_fingerprint
    from glmtune.modeling import create_model_dir

    base = exports.get("base", "v2")
    other = create_model_dir("v2", "tiny", tmp_path / "other", seed=1)
    storage.upload_dir(base, f"s3://{bucket}/fp-base")
    storage.upload_dir(other, f"s3://{bucket}/fp-other")
    for name, base_uri in (("right", f"s3://{bucket}/fp-base"), ("wrong", f"s3://{bucket}/fp-other")):
        local = shutil.copytree(exports.get("adapter", "v2"), tmp_path / name)
        info = json.loads((local / "glmtune-export.json").read_text())
        info.update(base_model=base_uri, base_fingerprint=base_fingerprint(base))
        (local / "glmtune-export.json").write_text(json.dumps(info))
        storage.upload_dir(local, f"s3://{bucket}/fp-{name}")
    options = LoadOptions(cache_dir=tmp_path / "cache")
    assert len(load_served_models(f"s3://{bucket}/fp-right", options=options)) == 1
    with pytest.raises(InvalidInputError) as refused:
        load_served_models(f"s3://{bucket}/fp-wrong", options=options)
    assert base_fingerprint(other) in str(refused.value) and f"s3://{bucket}/fp-other" in str(refused.value)
    assert f"s3://{bucket}/fp-wrong/glmtune-export.json" in str(refused.value)
