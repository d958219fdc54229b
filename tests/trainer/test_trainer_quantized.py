"""Training over quantized bases: LoRA on bitsandbytes 8/4-bit, LoRA and ptv2 on glmtune's int8/int4 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from glmtune_trainer.checkpoint import load_weights
from glmtune_trainer.metrics import read_metrics
from glmtune_trainer.run import train_spec


def _finite_losses(workdir: Path) -> list[float]:
    losses = [m["loss"] for m in read_metrics(workdir / "logs", "train")]
    assert losses and all(loss == loss and loss < 100 for loss in losses)
    return losses


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_bitsandbytes_base_trains_and_exports_merged(make_spec, tmp_path: Path, bits: int) -> None:
    from glmtune.export_format import read_export_info

    spec = make_spec("lora", maxSteps=3)
    spec.spec.model.quantization = type(spec.spec.model).model_fields["quantization"].annotation.__args__[0](
        bits=bits, backend="bitsandbytes")
    result = train_spec(spec, tmp_path / "run")
    _finite_losses(tmp_path / "run")
    assert all("lora_" in k for k in load_weights(result.checkpoint_dir / "model.safetensors"))
    assert read_export_info(result.export.uri).kind == "merged"


@pytest.mark.parametrize(("method", "bits"), [("ptv2", 4), ("lora", 8), ("lora", 4)])
def test_training_on_glmtune_weight_only_quantized_base(make_spec, tmp_path: Path, method: str, bits: int) -> None:
    from glmtune.spec import spec_from_mapping

    spec = make_spec(method, family="v1", maxSteps=3)
    mapping = spec.model_dump(by_alias=True, exclude_none=True)
    mapping["spec"]["model"]["quantization"] = {"bits": bits, "backend": "glmtune"}
    result = train_spec(spec_from_mapping(mapping, "test"), tmp_path / "run")
    _finite_losses(tmp_path / "run")
    trained = load_weights(result.checkpoint_dir / "model.safetensors")
    prefix = "transformer.prefix_encoder." if method == "ptv2" else None
    assert all(k.startswith(prefix) if prefix else "lora_" in k for k in trained)


def test_a_ptv2_int4_export_is_served_over_the_int4_base_it_was_trained_on(make_spec, tmp_path: Path) -> None:
    """export.json records the int4 base; serving quantizes it again, so the served answer is the trained model's."""
    from glmtune_inference.chat import ChatModel
    from glmtune_inference.loading import ServedModel, load_served_models

    from glmtune.export_format import read_export_info
    from glmtune.modeling import load_model
    from glmtune.modeling.quantization import QuantizedLinear
    from glmtune.spec import spec_from_mapping
    from glmtune.tokenization import load_tokenizer

    spec = make_spec("ptv2", family="v2", method_settings={"preSeqLen": 4}, maxSteps=3, learningRate=5e-2)
    mapping = spec.model_dump(by_alias=True, exclude_none=True)
    mapping["spec"]["model"]["quantization"] = {"bits": 4, "backend": "glmtune"}
    result = train_spec(spec_from_mapping(mapping, "test"), tmp_path / "run")
    assert read_export_info(result.export.uri).quantization_bit == 4
    (served,) = load_served_models(result.export.uri).values()
    assert {m.bits for m in served.model.modules() if isinstance(m, QuantizedLinear)} == {4}

    base = mapping["spec"]["model"]["uri"]
    trained = load_model(base, quantization_bit=4, config_overrides={"pre_seq_len": 4, "prefix_projection": False})
    trained.load_state_dict(load_weights(result.checkpoint_dir / "model.safetensors"), strict=False)
    in_memory = ServedModel("trained", trained.eval(), load_tokenizer(base), served.template, served.family,
                            served.context_length, prefix_len=4)
    for query in ("你好", "写一首诗"):
        expected = ChatModel(in_memory).chat(query, do_sample=False, max_new_tokens=12)[0]
        assert ChatModel(served).chat(query, do_sample=False, max_new_tokens=12)[0] == expected
