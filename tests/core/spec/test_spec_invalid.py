"""Invalid specs are rejected with the offending field path and the line of the YAML file it is on.

Each case is a YAML file; the line marked `#!` is where the error must point.
"""

from __future__ import annotations

import pytest
from spec_cases import CASES, bare

from glmtune.errors import InvalidInputError
from glmtune.spec import load_spec_file


def _marked_line(text: str) -> int:
    lines = [number for number, line in enumerate(text.splitlines(), start=1) if "#!" in line]
    if len(lines) != 1:
        raise AssertionError(f"case must mark exactly one line with #!, marked {lines}")
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_spec_names_field_path_and_line(case: str, tmp_path) -> None:
    text, path = CASES[case]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text)
    with pytest.raises(InvalidInputError) as raised:
        load_spec_file(spec_file)
    assert raised.value.where == f"{spec_file}:{_marked_line(text)} ({path})", str(raised.value)
    assert raised.value.exit_code == 2


def test_zero_on_several_nodes_error_says_why_a_shared_claim_is_needed(tmp_path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(bare("training:\n  deepspeed: {stage: 3}", "method: {name: full}",
                              "resources: {nodes: 2}"))
    with pytest.raises(InvalidInputError) as raised:
        load_spec_file(spec_file)
    message = str(raised.value)
    assert "ReadWriteMany" in message and "every rank reads all of them" in message


@pytest.mark.parametrize(("device", "line"), [("gpu", "device: gpu"), ("cuda:x", "device: 'cuda:x'")])
def test_serving_device_must_be_auto_cpu_cuda_or_cuda_n(device: str, line: str, tmp_path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(bare(f"serving:\n  {line}  #!"))
    with pytest.raises(InvalidInputError) as raised:
        load_spec_file(spec_file)
    assert raised.value.where.endswith("(spec.serving.device)"), str(raised.value)


def test_serving_on_cuda_needs_the_pod_to_get_a_gpu(tmp_path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(bare("serving:\n  device: cuda  #!"))
    with pytest.raises(InvalidInputError) as raised:
        load_spec_file(spec_file)
    assert raised.value.where == f"{spec_file}:{_marked_line(spec_file.read_text())} (spec.serving.device)"
    assert "resources.gpus" in str(raised.value)
    spec_file.write_text(bare("serving:\n  device: 'cuda:0'\n  resources: {gpus: 1}"))
    assert load_spec_file(spec_file).spec.serving.device == "cuda:0"


def test_serving_device_pattern_is_the_loaders() -> None:
    """The spec stays torch-free, so it spells the pattern itself; it must accept exactly what the loader does."""
    from glmtune.export_loading import DEVICE_PATTERN
    from glmtune.spec.cluster import SERVING_DEVICE_PATTERN

    assert SERVING_DEVICE_PATTERN == DEVICE_PATTERN
