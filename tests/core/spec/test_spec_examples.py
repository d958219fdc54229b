"""Valid specs load, expose snake_case attributes, fill defaults, and survive a manifest round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO_ROOT

from glmtune.spec import (
    GLMFineTune,
    LoraSpec,
    PrefixTuningSpec,
    load_spec_file,
    spec_from_mapping,
)

EXAMPLES = Path(__file__).parent / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_example_specs_are_valid(path: Path) -> None:
    assert isinstance(load_spec_file(path), GLMFineTune)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_manifest_round_trip_is_stable(path: Path) -> None:
    manifest = load_spec_file(path).to_manifest()
    assert spec_from_mapping(manifest).to_manifest() == manifest


def test_full_example_reads_as_snake_case_attributes() -> None:
    spec = load_spec_file(EXAMPLES / "full.yaml").spec
    assert spec.model.quantization.backend == "bitsandbytes"
    assert spec.data.max_invalid_fraction == pytest.approx(0.01)
    assert spec.method.lora.target_modules == ["query_key_value", "dense"]
    assert spec.method.lora.use_rslora is True
    assert spec.training.gradient_accumulation_steps == 8
    assert spec.training.deepspeed.offload_optimizer is True
    assert spec.training.checkpoint.mirror_uri == "s3://checkpoints/support-bot"
    assert spec.resources.world_size == 8
    assert spec.resources.cpu == "16" and spec.resources.memory == "128Gi"
    assert spec.resources.tolerations[0].operator == "Exists"
    assert spec.s3.secret_ref.access_key_id_key == "key"
    assert spec.serving.service_type == "LoadBalancer"
    assert spec.run_policy.ttl_seconds_after_finished == 3600


def test_manifest_uses_camel_case_and_includes_defaults() -> None:
    manifest = load_spec_file(EXAMPLES / "minimal-bare.yaml").to_manifest()
    assert manifest["apiVersion"] == "glmtune.io/v1alpha1" and manifest["kind"] == "GLMFineTune"
    assert manifest["spec"]["data"]["maxLength"] == 512
    assert manifest["spec"]["training"]["checkpoint"]["keepLast"] == 2
    assert manifest["spec"]["runPolicy"]["backoffLimit"] == 3
    assert "max_length" not in manifest["spec"]["data"]


def test_seed_method_defaults() -> None:
    lora = LoraSpec()
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (8, 32, 0.1, ["query_key_value"])
    adalora = load_spec_file(EXAMPLES / "adalora.yaml").spec.method.adalora
    assert (adalora.target_r, adalora.init_r, adalora.beta1, adalora.beta2, adalora.orth_reg_weight) == (
        8,
        12,
        0.85,
        0.85,
        0.5,
    )


def test_chosen_method_section_is_filled_with_defaults_when_absent() -> None:
    spec = spec_from_mapping(
        {
            "model": {"uri": "m"},
            "data": {"sources": ["a"]},
            "output": {"uri": "o"},
            "method": {"name": "ptv2"},
        }
    ).spec
    assert spec.method.settings == PrefixTuningSpec()
    assert spec.method.lora is None


def test_default_method_is_lora_and_full_has_no_settings() -> None:
    base = {"model": {"uri": "m"}, "data": {"sources": ["a"]}, "output": {"uri": "o"}}
    assert spec_from_mapping(base).spec.method.settings == LoraSpec()
    assert spec_from_mapping({**base, "method": {"name": "full"}}).spec.method.settings is None


def test_model_dtype_follows_training_precision_unless_set() -> None:
    base = {"model": {"uri": "m"}, "data": {"sources": ["a"]}, "output": {"uri": "o"}}
    assert spec_from_mapping({**base, "training": {"precision": "bf16"}}).spec.model_dtype == "bfloat16"
    explicit = {**base, "model": {"uri": "m", "dtype": "float16"}, "training": {"precision": "bf16"}}
    assert spec_from_mapping(explicit).spec.model_dtype == "float16"


def test_processes_per_node_default_to_gpus_or_one() -> None:
    base = {"model": {"uri": "m"}, "data": {"sources": ["a"]}, "output": {"uri": "o"}}
    assert spec_from_mapping(base).spec.resources.procs_per_node == 1
    gpus = spec_from_mapping({**base, "resources": {"nodes": 3, "gpusPerNode": 8}}).spec.resources
    assert (gpus.procs_per_node, gpus.world_size) == (8, 24)


def test_zero_across_nodes_is_valid_with_a_shared_work_dir_claim_and_ddp_needs_none() -> None:
    base = {"model": {"uri": "m"}, "data": {"sources": ["a"]}, "output": {"uri": "o"}, "method": {"name": "full"}}
    zero = {**base, "training": {"deepspeed": {"stage": 3}}}
    shared = spec_from_mapping({**zero, "resources": {"nodes": 2, "workdirClaim": "train-shared"}}).spec
    assert shared.resources.workdir_claim == "train-shared"
    assert spec_from_mapping({**zero, "resources": {"nodes": 1}}).spec.resources.workdir_claim is None
    assert spec_from_mapping({**base, "resources": {"nodes": 4}}).spec.resources.nodes == 4


def test_spec_package_does_not_import_torch() -> None:
    code = "import sys, glmtune.spec, glmtune.crd, glmtune.spec_docs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False).returncode == 0


@pytest.mark.parametrize(("method", "export"), [("lora", "merged"), ("adalora", "merged"), ("ptv2", "adapter"),
                                                ("freeze", "merged"), ("full", "merged")])
def test_absent_export_is_the_methods_own_form(method: str, export: str) -> None:
    section = {"freeze": {"trainLastLayers": 1}} if method == "freeze" else {}
    resource = spec_from_mapping({"model": {"uri": "m"}, "data": {"sources": ["a"]}, "output": {"uri": "o"},
                                  "method": {"name": method, **section}, "training": {"maxSteps": 10}})
    assert resource.spec.output.export == export
    assert spec_from_mapping(resource.to_manifest()) == resource  # what the operator hands the trainer loads again
