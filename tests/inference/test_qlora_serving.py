"""A QLoRA adapter (LoRA trained over a bitsandbytes 4-bit NF4 base) is served over that very base, not over
glmtune's int4: a real tiny training run, exported as an adapter, loaded by `glmtune.load_model` and by serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from glmtune_inference.chat import ChatModel
from glmtune_inference.loading import LoadOptions, ServedModel, load_served_models
from testkit import REPO_ROOT

from glmtune import export_inspect
from glmtune.errors import InvalidInputError
from glmtune.export_format import EXPORT_FILE, ExportInfo, read_export_info
from glmtune.export_loading import keep_training_kernels
from glmtune.modeling.quantization import QuantizedLinear

QUERIES = ("你好", "写一首诗")
IDS = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def qlora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA trained 3 steps over the NF4 base, its adapter export, and the trained model as training held it."""
    from glmtune_trainer.checkpoint import load_weights
    from glmtune_trainer.methods import apply_method, load_overrides
    from glmtune_trainer.model_setup import load_training_model
    from glmtune_trainer.run import train_spec

    from glmtune.modeling import create_model_dir
    from glmtune.spec import spec_from_mapping

    root = tmp_path_factory.mktemp("qlora")
    base = create_model_dir("v2", "tiny", root / "base", seed=0)
    spec = spec_from_mapping({"metadata": {"name": "qlora"}, "spec": {
        "model": {"uri": str(base), "quantization": {"bits": 4, "backend": "bitsandbytes"}},
        "data": {"sources": [str(REPO_ROOT / "examples" / "data" / "quickstart.jsonl")], "maxLength": 64},
        "method": {"name": "lora", "lora": {"r": 4, "dropout": 0.0}},
        "training": {"epochs": 2, "batchSize": 2, "learningRate": 5e-2, "maxSteps": 3, "logEverySteps": 1,
                     "evaluation": {"everyEpoch": False}},
        "output": {"uri": str(root / "export"), "export": "adapter"},
    }}, "test")
    result = train_spec(spec, root / "run")
    method = spec.spec.method
    trained = load_training_model({"path": str(base), "family": "v2", "dtype": "float32", "bnb_bits": 4,
                                   "glmtune_bits": None}, load_overrides(method))
    trained = apply_method(trained, method, 3)
    trained.load_state_dict(load_weights(result.checkpoint_dir / "model.safetensors"), strict=False)
    keep_training_kernels(trained)  # the kernels it trained with: no-grad forwards would take bnb's CPU fast path
    return {"export": Path(result.export.uri), "base": base, "trained": trained.eval()}


def bnb_4bit_layers(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits


def greedy(served: ServedModel, query: str) -> str:
    return ChatModel(served).chat(query, do_sample=False, max_new_tokens=12)[0]


def test_a_qlora_adapter_export_records_the_bitsandbytes_base(qlora):
    info = read_export_info(qlora["export"])
    assert (info.kind, info.quantization_bit, info.quantization_backend) == ("adapter", 4, "bitsandbytes")
    assert "bitsandbytes" in " ".join(info.to_json()["original_code"]["notes"])
    text = export_inspect.render(export_inspect.describe(str(qlora["export"])), "e")
    assert "quantization: int4 (the base it was trained over, loaded by bitsandbytes 4-bit NF4" in text


def test_load_model_rebuilds_the_nf4_base_and_matches_the_trained_model(qlora):
    import glmtune

    model = glmtune.load_model(qlora["export"])
    assert bnb_4bit_layers(model) > 0 and not any(isinstance(m, QuantizedLinear) for m in model.modules())
    torch.testing.assert_close(logits(model), logits(qlora["trained"]), rtol=1e-5, atol=1e-5)


def test_serving_answers_as_the_trained_qlora_model(qlora):
    from glmtune.tokenization import load_tokenizer

    (served,) = load_served_models(str(qlora["export"]), options=LoadOptions(device="cpu")).values()
    assert bnb_4bit_layers(served.model) > 0
    in_memory = ServedModel("trained", qlora["trained"], load_tokenizer(qlora["base"]), served.template,
                            served.family, served.context_length)
    torch.testing.assert_close(logits(served.model), logits(qlora["trained"]), rtol=1e-5, atol=1e-5)
    for query in QUERIES:
        assert greedy(served, query) == greedy(in_memory, query)


def test_quantize_override_uses_glmtune_layers_and_merge_into_nf4_is_refused(qlora):
    import glmtune

    full = glmtune.load_model(qlora["export"], quantization_bit=0, merge_adapter=True)
    assert bnb_4bit_layers(full) == 0 and not any(isinstance(m, QuantizedLinear) for m in full.modules())
    (served,) = load_served_models(str(qlora["export"]), options=LoadOptions(quantization_bit=4)).values()
    assert bnb_4bit_layers(served.model) == 0
    assert {m.bits for m in served.model.modules() if isinstance(m, QuantizedLinear)} == {4}
    with pytest.raises(InvalidInputError, match="cannot be merged into a bitsandbytes"):
        glmtune.load_model(qlora["export"], merge_adapter=True)


def test_an_export_file_without_the_backend_means_glmtune(qlora, tmp_path: Path):
    import glmtune

    old = shutil.copytree(qlora["export"], tmp_path / "old")
    (old / "glmtune-manifest.json").unlink()
    data = json.loads((old / EXPORT_FILE).read_text())
    del data["quantization_backend"]
    (old / EXPORT_FILE).write_text(json.dumps(data))
    assert read_export_info(old).quantization_backend == "glmtune"
    model = glmtune.load_model(old)
    assert bnb_4bit_layers(model) == 0
    assert {m.bits for m in model.modules() if isinstance(m, QuantizedLinear)} == {4}
    # It and the QLoRA export cannot share one base: an int4 and an NF4 base are different models.
    with pytest.raises(InvalidInputError, match="different backends") as err:
        load_served_models(str(qlora["export"]), {"old": str(old)})
    assert "quantization_backend" in str(err.value)


@pytest.mark.parametrize(("kind", "bits", "backend"), [("merged", 4, "bitsandbytes"), ("adapter", 0, "bitsandbytes"),
                                                       ("adapter", 4, "bnb")])
def test_the_backend_field_is_validated(kind, bits, backend):
    with pytest.raises(InvalidInputError, match="quantization_backend"):
        ExportInfo(kind=kind, family="v2", template="v2", method="lora", base_model="/b", quantization_bit=bits,
                   quantization_backend=backend)


def test_loading_a_qlora_export_prints_nothing(qlora):
    """A fresh process: bitsandbytes' import-time CPU-kernel notice, transformers' model-type warning and its
    progress bar stay out of a server's log."""
    import subprocess
    import sys

    code = f"import glmtune\nglmtune.load_model({str(qlora['export'])!r})\nprint('loaded')\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "loaded" and done.stderr.strip() == ""
