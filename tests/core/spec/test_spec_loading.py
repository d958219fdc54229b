"""Loading specs: full objects and bare specs, `--set` overrides, YAML errors, mappings from the API."""

from __future__ import annotations

import pytest

from glmtune.errors import InvalidInputError
from glmtune.spec import GLMFineTune, SpecError, load_spec_file, spec_from_mapping, spec_from_yaml

BARE = """\
model: {uri: /models/glm}
data: {sources: [data/a.json]}
output: {uri: out}
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "My Demo.yaml"
    path.write_text(BARE)
    return path


def test_bare_spec_is_wrapped_into_an_object(spec_file) -> None:
    resource = load_spec_file(spec_file)
    assert isinstance(resource, GLMFineTune)
    assert resource.api_version == "glmtune.io/v1alpha1" and resource.kind == "GLMFineTune"
    assert resource.spec.output.uri == "out"


def test_metadata_name_defaults_to_the_file_name(spec_file) -> None:
    assert load_spec_file(spec_file).metadata.name == "my-demo"


def test_overrides_accept_camel_and_snake_case_paths(spec_file) -> None:
    resource = load_spec_file(
        spec_file,
        [
            "training.learningRate=1e-3",
            "spec.data.max_length=128",
            "training.deepspeed.stage=1",
            "method.lora.r=4",
        ],
    )
    assert resource.spec.training.learning_rate == pytest.approx(1e-3)
    assert resource.spec.data.max_length == 128
    assert resource.spec.training.deepspeed.stage == 1
    assert resource.spec.method.lora.r == 4


def test_override_values_are_parsed_as_yaml(spec_file) -> None:
    resource = load_spec_file(spec_file, ["data.sources=[x.json, s3://bucket/y]", "data.shuffle=false"])
    assert resource.spec.data.sources == ["x.json", "s3://bucket/y"]
    assert resource.spec.data.shuffle is False


def test_override_reuses_the_spelling_already_in_the_file(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(BARE + "training: {learning_rate: 0.1}\n")
    assert load_spec_file(path, ["training.learningRate=0.2"]).spec.training.learning_rate == pytest.approx(
        0.2
    )


def test_override_indexes_into_lists(spec_file) -> None:
    assert load_spec_file(spec_file, ["data.sources.0=other.json"]).spec.data.sources == ["other.json"]


def test_invalid_override_value_names_the_override(spec_file) -> None:
    with pytest.raises(SpecError) as raised:
        load_spec_file(spec_file, ["data.maxLength=4"])
    assert raised.value.where == "--set data.maxLength=4 (spec.data.maxLength)"


def test_override_without_equals_sign_is_rejected(spec_file) -> None:
    with pytest.raises(InvalidInputError, match="dotted.path=value") as raised:
        load_spec_file(spec_file, ["training.learningRate"])
    assert raised.value.where == "--set training.learningRate"


def test_override_through_a_scalar_is_rejected(spec_file) -> None:
    with pytest.raises(InvalidInputError, match="not a mapping"):
        load_spec_file(spec_file, ["output.uri.deeper=1"])


def test_invalid_yaml_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  uri: /m\ndata:\n  sources: [a.json\noutput: {uri: out}\n")
    with pytest.raises(InvalidInputError, match="invalid YAML") as raised:
        load_spec_file(path)
    assert raised.value.where.startswith(f"{path}:")
    assert int(raised.value.where.rsplit(":", 1)[1]) in (4, 5, 6)


def test_duplicate_keys_are_rejected_with_their_line(tmp_path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(BARE + "model: {uri: /other}\n")
    with pytest.raises(InvalidInputError, match="duplicate key 'model'") as raised:
        load_spec_file(path)
    assert raised.value.where == f"{path}:4"


def test_a_document_that_is_not_a_mapping_is_rejected(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(InvalidInputError, match="must be a mapping"):
        load_spec_file(path)


def test_missing_file_is_invalid_input(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="not found"):
        load_spec_file(tmp_path / "absent.yaml")


def test_every_problem_is_reported_not_only_the_first(tmp_path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(
        "model: {uri: m}\ndata:\n  sources: [a.json]\n  maxLength: 1\noutput: {uri: out}\ntraining:\n  epochs: 0\n"
    )
    with pytest.raises(SpecError) as raised:
        load_spec_file(path)
    assert [where for where, _ in raised.value.problems] == [
        f"{path}:4 (spec.data.maxLength)",
        f"{path}:7 (spec.training.epochs)",
    ]


def test_unknown_field_suggests_the_closest_name(tmp_path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(BARE + "training: {learningRte: 1e-4}\n")
    with pytest.raises(SpecError, match="did you mean 'learningRate'"):
        load_spec_file(path)


def test_spec_from_mapping_names_the_source_and_path() -> None:
    body = {
        "apiVersion": "glmtune.io/v1alpha1",
        "kind": "GLMFineTune",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "1234", "resourceVersion": "7"},
        "spec": {
            "model": {"uri": "m"},
            "data": {"sources": ["a.json"]},
            "output": {"uri": "o"},
            "method": {"name": "bogus"},
        },
    }
    with pytest.raises(SpecError) as raised:
        spec_from_mapping(body, source="ml/demo")
    assert raised.value.where == "ml/demo (spec.method.name)"


def test_spec_from_mapping_keeps_kubernetes_metadata_and_status_extras() -> None:
    body = {
        "metadata": {"name": "demo", "uid": "1234", "generation": 3},
        "spec": {"model": {"uri": "m"}, "data": {"sources": ["a.json"]}, "output": {"uri": "o"}},
        "status": {"phase": "Training", "run": 2, "kopf": {"progress": {}}},
    }
    resource = spec_from_mapping(body)
    manifest = resource.to_manifest()
    assert manifest["metadata"]["uid"] == "1234" and manifest["metadata"]["generation"] == 3
    assert manifest["status"]["kopf"] == {"progress": {}}
    assert resource.status.phase == "Training" and resource.status.run == 2
    assert body["spec"]["output"] == {"uri": "o"}, "the caller's mapping must not be modified"


def test_spec_from_yaml_reports_lines_under_its_source_name() -> None:
    with pytest.raises(SpecError) as raised:
        spec_from_yaml(BARE + "serving: {port: 0}\n", source="configmap/spec.yaml")
    assert raised.value.where == "configmap/spec.yaml:4 (spec.serving.port)"


def test_the_removed_data_mixed_field_says_what_replaced_it(tmp_path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(BARE.replace("data: {sources: [data/a.json]}", "data: {sources: [data/a.json], mixed: false}"))
    with pytest.raises(SpecError) as raised:
        load_spec_file(path)
    assert raised.value.where == f"{path}:2 (spec.data.mixed)"
    assert "all sources together" in str(raised.value) and "--per-file" in str(raised.value)


def test_every_broken_rule_of_a_section_is_reported(tmp_path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BARE.replace("output: {uri: out}", "output: {uri: out, export: merged, bits: 4}")
                    + "method: {name: ptv2}\n")
    with pytest.raises(SpecError) as raised:
        load_spec_file(path)
    assert [where for where, _ in raised.value.problems] == [f"{path}:3 (spec.output.export)",
                                                             f"{path}:3 (spec.output.bits)"]
