"""Facts derived from a spec in one place: the base dtype rule and the list of storage locations."""

from __future__ import annotations

import pytest

from glmtune.spec import spec_from_mapping

BASE = {"model": {"uri": "m"}, "data": {"sources": ["a"]}, "output": {"uri": "o"}}


@pytest.mark.parametrize(("method", "precision", "dtype"), [
    ("lora", "bf16", "bfloat16"), ("lora", "fp16", "float16"), ("ptv2", "fp32", "float32"),
    ("full", "bf16", "float32"), ("full", "fp16", "float32"),
])
def test_base_dtype_rule(method: str, precision: str, dtype: str) -> None:
    spec = spec_from_mapping({**BASE, "method": {"name": method}, "training": {"precision": precision}}).spec
    assert spec.model_dtype == dtype


def test_explicit_model_dtype_wins_for_every_method() -> None:
    spec = spec_from_mapping({**BASE, "model": {"uri": "m", "dtype": "bfloat16"}, "method": {"name": "full"}}).spec
    assert spec.model_dtype == "bfloat16"


def test_trainer_loads_the_base_in_the_specs_dtype(tmp_path) -> None:
    pytest.importorskip("torch")
    from glmtune_trainer.model_setup import prepare_base_model

    spec = spec_from_mapping({"model": {"family": "v2", "create": {"size": "tiny"}}, "data": {"sources": ["a"]},
                              "output": {"uri": "o"}, "method": {"name": "full"},
                              "training": {"precision": "bf16"}})
    assert prepare_base_model(spec, tmp_path)["dtype"] == "float32" == spec.spec.model_dtype


def test_locations_lists_every_storage_field_by_path() -> None:
    spec = spec_from_mapping({
        "model": {"uri": "s3://bkt/base"}, "data": {"sources": ["d1.jsonl", "s3://bkt/d2"], "cache": "cache"},
        "output": {"uri": "out"}, "training": {"checkpoint": {"mirrorUri": "s3://bkt/ckpt", "resume": "/r/ckpt"}},
    }).spec
    assert spec.locations() == {
        "spec.model.uri": "s3://bkt/base", "spec.data.sources[0]": "d1.jsonl", "spec.data.sources[1]": "s3://bkt/d2",
        "spec.data.cache": "cache", "spec.output.uri": "out", "spec.training.checkpoint.mirrorUri": "s3://bkt/ckpt",
        "spec.training.checkpoint.resume": "/r/ckpt",
    }
    assert "spec.training.checkpoint.resume" not in spec_from_mapping(BASE).spec.locations()
