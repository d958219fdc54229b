"""manifests/examples: one GLMFineTune per tuning method and the S3 Secret and work-dir claim they use, all valid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from testkit import REPO_ROOT

from glmtune.crd import build_crd
from glmtune.spec import GLMFineTune, load_spec_file

EXAMPLES = REPO_ROOT / "manifests" / "examples"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


FINETUNES = sorted(path for path in EXAMPLES.glob("*.yaml") if _load(path)["kind"] == "GLMFineTune")
SECRETS = {
    obj["metadata"]["name"]: obj for obj in map(_load, EXAMPLES.glob("*.yaml")) if obj["kind"] == "Secret"
}
CLAIMS = {
    obj["metadata"]["name"]: obj
    for obj in map(_load, EXAMPLES.glob("*.yaml"))
    if obj["kind"] == "PersistentVolumeClaim"
}


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft4Validator:
    """The CRD's openAPIV3Schema as a validator (OpenAPI v3.0 schemas follow draft 4 semantics)."""
    (version,) = build_crd()["spec"]["versions"]
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


def _loaded() -> dict[str, GLMFineTune]:
    return {path.stem: load_spec_file(path) for path in FINETUNES}


@pytest.mark.parametrize("path", FINETUNES, ids=lambda p: p.name)
def test_example_passes_the_crd_schema(crd_validator: jsonschema.Draft4Validator, path: Path) -> None:
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator.iter_errors(_load(path))
    ]
    assert errors == []


@pytest.mark.parametrize("path", FINETUNES, ids=lambda p: p.name)
def test_example_loads_as_a_spec_with_its_own_name(path: Path) -> None:
    resource = load_spec_file(path)
    assert resource.name == _load(path)["metadata"]["name"]
    assert resource.spec.output.uri.startswith("s3://")


def test_crd_schema_rejects_an_unknown_method(crd_validator: jsonschema.Draft4Validator) -> None:
    broken = copy.deepcopy(_load(EXAMPLES / "lora.yaml"))
    broken["spec"]["method"]["name"] = "qlora"
    assert any(error.absolute_path[-1] == "name" for error in crd_validator.iter_errors(broken))


def test_examples_cover_every_method_including_int4_ptv2_and_multi_node_zero3() -> None:
    loaded = _loaded()
    assert {resource.spec.method.name for resource in loaded.values()} == {
        "lora",
        "adalora",
        "ptv2",
        "freeze",
        "full",
    }
    (ptv2,) = [r.spec for r in loaded.values() if r.spec.method.name == "ptv2"]
    assert ptv2.model.quantization is not None and ptv2.model.quantization.bits == 4
    (full,) = [r.spec for r in loaded.values() if r.spec.method.name == "full"]
    assert full.training.deepspeed is not None and full.training.deepspeed.stage == 3
    assert (full.resources.nodes, full.resources.gpus_per_node) == (2, 8)


def test_every_referenced_s3_secret_is_an_example_with_the_expected_keys() -> None:
    for stem, resource in _loaded().items():
        ref = resource.spec.s3.secret_ref
        assert ref is not None, f"{stem}.yaml reads S3 without credentials"
        secret = SECRETS[ref.name]
        assert {ref.access_key_id_key, ref.secret_access_key_key} <= secret["stringData"].keys()


def test_every_referenced_api_key_secret_is_an_example_with_the_key() -> None:
    used = {stem: r.spec.serving.api_key_secret for stem, r in _loaded().items() if r.spec.serving.api_key_secret}
    assert used, "an example shows how to require an API key"
    for stem, ref in used.items():
        assert ref.name in SECRETS, f"{stem}.yaml reads its API key from Secret {ref.name!r} that no example defines"
        assert ref.key in SECRETS[ref.name]["stringData"]


def test_secret_example_is_a_valid_kubernetes_secret() -> None:
    for secret in SECRETS.values():
        kubernetes_validate.validate(secret, "1.33.0", strict=True)


def test_every_referenced_workdir_claim_is_a_read_write_many_example() -> None:
    used = {stem: r.spec.resources.workdir_claim for stem, r in _loaded().items() if r.spec.resources.workdir_claim}
    assert used, "the multi-node ZeRO-3 example must name its shared work dir"
    for stem, name in used.items():
        assert name in CLAIMS, f"{stem}.yaml uses claim {name!r} that no example defines"
        assert CLAIMS[name]["spec"]["accessModes"] == ["ReadWriteMany"]
        kubernetes_validate.validate(CLAIMS[name], "1.33.0", strict=True)
