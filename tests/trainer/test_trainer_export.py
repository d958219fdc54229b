"""Exports: merged weights in the original key format, peft adapters, prefixes, re-quantized, to S3 safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from glmtune_trainer.export import export, read_run, rebuild_trained_model
from glmtune_trainer.run import train_spec

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import ExportInfo, read_export_info, write_export_info


@pytest.fixture
def lora_checkpoint(make_spec, tmp_path: Path) -> Path:
    spec = make_spec("lora", family="v1", method_settings={"r": 4, "dropout": 0.0}, maxSteps=3, learningRate=5e-2,
                     output={"export": "adapter"})
    return train_spec(spec, tmp_path / "run").checkpoint_dir


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits for a v1 prompt: text ids then [gMASK] <sop>, as the original inputs end."""
    config = model.config
    prompt = torch.tensor([ids + [config.gmask_token_id, config.bos_token_id]])
    with torch.no_grad():
        return model(input_ids=prompt).logits


def test_merged_lora_export_uses_original_keys_and_matches_the_trained_model(lora_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    from safetensors import safe_open

    from glmtune.modeling import load_model

    result = export(lora_checkpoint, str(tmp_path / "merged"), "merged")
    run = read_run(lora_checkpoint)
    trained = rebuild_trained_model(lora_checkpoint, run)
    merged = load_model(result.uri)
    ids = [5, 6, 7, 8, 9, 10]
    torch.testing.assert_close(_logits(merged, ids), _logits(trained, ids), rtol=1e-4, atol=1e-4)
    base_keys = set(load_model(run["base_model"]).state_dict())
    with safe_open(str(Path(result.uri) / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) >= base_keys and not any("lora" in k for k in handle.keys())
    assert json.loads((Path(result.uri) / "config.json").read_text())["model_type"] == "chatglm"
    info = read_export_info(result.uri, require_complete=True)
    assert (info.kind, info.family, info.method, info.base_model) == ("merged", "v1", "lora", None)


def test_adapter_export_is_peft_format_over_the_base_model(lora_checkpoint: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from glmtune.modeling import load_model

    adapter = export(lora_checkpoint, str(tmp_path / "adapter"), "adapter")
    merged = export(lora_checkpoint, str(tmp_path / "merged"), "merged")
    info = read_export_info(adapter.uri)
    assert info.kind == "adapter" and info.base_model
    assert {"adapter_config.json", "adapter_model.safetensors", "ice_text.model"} <= set(adapter.files)
    with_adapter = PeftModel.from_pretrained(load_model(info.base_model), adapter.uri).eval()
    ids = [5, 6, 7, 8, 9]
    torch.testing.assert_close(_logits(with_adapter, ids), _logits(load_model(merged.uri), ids), rtol=1e-4, atol=1e-4)


def _block_bits(model: torch.nn.Module) -> set[int]:
    from glmtune.modeling.quantization import QuantizedLinear

    return {m.bits for m in model.modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("bits", [8, 4])
def test_a_requantized_export_answers_exactly_as_the_quantized_in_memory_model(lora_checkpoint: Path,
                                                                              tmp_path: Path, bits: int) -> None:
    from glmtune.modeling import load_model

    result = export(lora_checkpoint, str(tmp_path / f"int{bits}"), "merged", bits=bits)
    assert read_export_info(result.uri).quantization_bit == bits
    loaded = load_model(result.uri)
    in_memory = rebuild_trained_model(lora_checkpoint, read_run(lora_checkpoint)).merge_and_unload().quantize(bits)
    assert _block_bits(loaded) == {bits}
    ids = [5, 6, 7, 8, 9, 10]
    torch.testing.assert_close(_logits(loaded, ids), _logits(in_memory, ids), rtol=0, atol=0)


def test_output_bits_in_the_spec_exports_int4_weights(make_spec, tmp_path: Path) -> None:
    from glmtune.modeling import load_model

    spec = make_spec("lora", family="v2", method_settings={"r": 4, "dropout": 0.0}, maxSteps=2,
                     output={"export": "merged", "bits": 4})
    result = train_spec(spec, tmp_path / "run")
    assert read_export_info(result.export.uri).quantization_bit == 4
    loaded = load_model(result.export.uri)
    in_memory = rebuild_trained_model(result.checkpoint_dir, read_run(result.checkpoint_dir))
    in_memory = in_memory.merge_and_unload().quantize(4)
    assert _block_bits(loaded) == {4}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, rtol=0, atol=0)


def test_full_training_has_no_adapter_to_export(make_spec, tmp_path: Path) -> None:
    checkpoint = train_spec(make_spec("full", maxSteps=1), tmp_path / "run").checkpoint_dir
    with pytest.raises(InvalidInputError, match="no adapter"):
        export(checkpoint, str(tmp_path / "out"), "adapter")


def test_export_to_s3_marks_completion_last_and_a_retry_completes(lora_checkpoint: Path, s3_bucket: str,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    import botocore.client

    uri = f"s3://{s3_bucket}/models/m1"
    original = botocore.client.BaseClient._make_api_call
    calls = {"n": 0}

    def flaky(self, operation_name, api_params):
        # The network drops on the third object sent, whichever way the upload sends objects.
        if operation_name in ("PutObject", "UploadPart", "CreateMultipartUpload"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise ConnectionError("network dropped")
        return original(self, operation_name, api_params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", flaky)
    with pytest.raises(ConnectionError):
        export(lora_checkpoint, uri, "merged")
    with pytest.raises(InvalidInputError, match="incomplete"):
        storage.fetch(uri, cache_dir=tmp_path / "cache", require_manifest=True)
    result = export(lora_checkpoint, uri, "merged")
    local = storage.fetch(uri, cache_dir=tmp_path / "cache", require_manifest=True)
    assert read_export_info(local, require_complete=True).kind == "merged"
    assert sorted(storage.read_manifest(local)["files"]) == result.files


def test_an_adapter_export_to_s3_carries_a_local_base_inside(lora_checkpoint: Path, s3_bucket: str,
                                                             tmp_path: Path) -> None:
    """The trainer's base folder is out of an inference pod's reach: it is uploaded with the adapter."""
    import glmtune

    uri = f"s3://{s3_bucket}/models/adapter"
    result = export(lora_checkpoint, uri, "adapter")
    assert {"base/config.json", "base/model.safetensors", "adapter_model.safetensors"} <= set(result.files)
    local = storage.fetch(uri, cache_dir=tmp_path / "cache", require_manifest=True)
    assert read_export_info(local).base_model == "base"
    merged = export(lora_checkpoint, str(tmp_path / "merged"), "merged")
    ids = [5, 6, 7, 8, 9]
    torch.testing.assert_close(_logits(glmtune.load_model(uri), ids), _logits(glmtune.load_model(merged.uri), ids),
                               rtol=1e-4, atol=1e-4)


def test_export_cli_reports_a_bad_checkpoint_with_exit_code_2(tmp_path: Path, capsys) -> None:
    from glmtune_app.cli import main

    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a glmtune training checkpoint" in capsys.readouterr().err


def test_export_info_round_trips_and_rejects_bad_files(tmp_path: Path) -> None:
    info = ExportInfo(kind="prefix", family="v2", template="v2", method="ptv2", base_model="s3://b/base",
                      pre_seq_len=8, run={"spec_name": "x", "steps": 3})
    write_export_info(tmp_path, info)
    assert read_export_info(tmp_path) == info
    with pytest.raises(InvalidInputError, match="glmtune-manifest.json is missing"):
        read_export_info(tmp_path, require_complete=True)
    data = json.loads((tmp_path / "glmtune-export.json").read_text())
    (tmp_path / "glmtune-export.json").write_text(json.dumps({**data, "kind": "weird"}))
    with pytest.raises(InvalidInputError, match="glmtune-export.json:kind"):
        read_export_info(tmp_path)
    with pytest.raises(InvalidInputError, match="needs base_model"):
        ExportInfo(kind="adapter", family="v1", template="v1", method="lora")


@pytest.mark.parametrize(("recorded", "expected"), [({"quantization_backend": "bitsandbytes"}, "bitsandbytes"),
                                                    ({}, "glmtune")])
def test_an_adapter_export_records_the_backend_its_base_was_quantized_with(lora_checkpoint: Path, tmp_path: Path,
                                                                           recorded: dict, expected: str) -> None:
    """run.json says which layers quantized the base; one written before the field existed means glmtune's."""
    import shutil

    from glmtune_trainer.checkpoint import RUN_FILE

    assert read_run(lora_checkpoint)["quantization_backend"] is None  # a full-precision run
    checkpoint = Path(shutil.copytree(lora_checkpoint, tmp_path / "ckpt"))
    (checkpoint / storage.MANIFEST_NAME).unlink(missing_ok=True)
    run = {k: v for k, v in read_run(checkpoint).items() if k != "quantization_backend"}
    (checkpoint / RUN_FILE).write_text(json.dumps({**run, "quantization_bits": 4, **recorded}))
    info = read_export_info(export(checkpoint, str(tmp_path / "adapter"), "adapter").uri)
    assert (info.quantization_bit, info.quantization_backend) == (4, expected)
    assert read_export_info(export(lora_checkpoint, str(tmp_path / "plain"), "adapter").uri).quantization_backend \
        == "glmtune"
