"""Loading every export kind for serving: each answers as the in-memory model it was saved from did, adapters
share one base, and broken exports fail with a clear, located error."""

from __future__ import annotations

import json
import shutil

import pytest
from glmtune_inference.chat import ChatModel
from glmtune_inference.loading import LoadOptions, load_served_models

from glmtune.errors import InvalidInputError
from glmtune.modeling.quantization import QuantizedLinear


def greedy(served_model, query):
    return ChatModel(served_model).chat(query, do_sample=False, max_new_tokens=24)[0]


def only(models):
    assert len(models) == 1
    return next(iter(models.values()))


@pytest.mark.parametrize(("kind", "family"), [
    ("full", "v1"), ("full", "v2"), ("adapter", "v1"), ("adapter", "v2"), ("adalora", "v2"),
    ("prefix", "v1"), ("prefix", "v2"),
])
def test_each_export_kind_answers_like_the_model_that_was_saved(exports, served, kind, family):
    model = only(served(exports.get(kind, family)))
    for query, answer in exports.reference[(kind, family)].items():
        assert greedy(model, query) == answer


@pytest.mark.parametrize("kind", ["full", "adapter", "adalora", "prefix"])
def test_trained_answers_come_back_for_every_kind(exports, served, trained_qa, kind):
    model = only(served(exports.get(kind, "v2")))
    for query, answer in trained_qa[kind]:
        assert greedy(model, query) == answer


def test_prefix_length_comes_from_the_saved_config(exports, served):
    model = only(served(exports.get("prefix", "v2")))
    assert model.prefix_len == model.model.config.pre_seq_len == 4


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_int8_stored_or_quantized_at_load_keeps_the_trained_answer(exports, served, trained_qa, family):
    stored = only(served(exports.get("int8", family)))
    at_load = only(served(exports.get("full", family), quantization_bit=8))
    for model in (stored, at_load):
        assert any(isinstance(m, QuantizedLinear) for m in model.model.modules())
        query, answer = trained_qa["full"][0]
        assert greedy(model, query) == answer


def test_int4_quantization_at_load_generates(exports, served):
    model = only(served(exports.get("full", "v2"), quantization_bit=4))
    assert any(isinstance(m, QuantizedLinear) for m in model.model.modules())
    assert ChatModel(model).chat("你好", do_sample=False, max_new_tokens=3)[0] is not None


def test_several_adapters_share_one_base_and_answer_by_name(exports, served, trained_qa):
    base = exports.get("base", "v2")
    models = served(base, {"lora": exports.get("adapter", "v2"), "ptv2": exports.get("prefix", "v2")}, name="glm")
    assert list(models) == ["glm", "lora", "ptv2"]
    assert greedy(models["lora"], "你好") == trained_qa["adapter"][0][1]
    assert greedy(models["ptv2"], "你好") == trained_qa["prefix"][0][1]
    assert greedy(models["glm"], "你好") == greedy(only(served(base)), "你好")
    base_weight = models["glm"].model.transformer.embedding.word_embeddings.weight
    for name in ("lora", "ptv2"):
        weight = models[name].model.get_input_embeddings().weight
        assert weight.data_ptr() == base_weight.data_ptr(), f"{name} copied the base weights"


def test_prefix_with_a_mismatched_pre_seq_len_is_a_clear_error(exports, tmp_path):
    broken = shutil.copytree(exports.get("prefix", "v2"), tmp_path / "prefix")
    (broken / "glmtune-manifest.json").unlink()
    config = json.loads((broken / "config.json").read_text())
    config["pre_seq_len"] = 6
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="pre_seq_len mismatch") as err:
        load_served_models(str(broken))
    assert "config.json" in str(err.value)
    export = json.loads((broken / "glmtune-export.json").read_text())
    export["pre_seq_len"] = 6
    (broken / "glmtune-export.json").write_text(json.dumps(export))
    with pytest.raises(InvalidInputError, match=r"pre_seq_len=6.*another pre_seq_len"):
        load_served_models(str(broken))


def test_a_tampered_local_export_fails_its_checksum(exports, tmp_path):
    copy = shutil.copytree(exports.get("full", "v2"), tmp_path / "full")
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"tampered")
    with pytest.raises(InvalidInputError, match="checksum") as err:
        load_served_models(str(copy))
    assert "model.safetensors" in str(err.value)


def test_an_adapter_option_must_name_an_adapter_export(exports):
    with pytest.raises(InvalidInputError, match="adapter"):
        load_served_models(str(exports.get("base", "v2")), {"x": str(exports.get("full", "v2"))})


def test_a_missing_model_directory_is_an_input_error(tmp_path):
    with pytest.raises(InvalidInputError) as err:
        load_served_models(str(tmp_path / "nope"), options=LoadOptions())
    assert str(tmp_path / "nope") in str(err.value)


def test_serve_and_chat_exit_2_on_a_bad_model_dir(tmp_path, capsys):
    from glmtune_app.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(tmp_path / "empty"), "--adapter", "no-equals-sign"]) == 2
