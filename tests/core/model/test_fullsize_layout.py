"""bench/fullsize.py: the published checkpoint layouts it writes load with glmtune.load_model (small configs)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from testkit import REPO_ROOT, require_shared

import glmtune
from glmtune.modeling.checkpoint import model_classes, parameters_on_meta
from glmtune.modeling.quantization import QuantizedLinear, dequantize_weight

SMALL = {"v1": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "inner_hidden_size": 256},
         "v2": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 160,
                "kv_channels": 16}}


@pytest.fixture(scope="module")
def fullsize():
    spec = importlib.util.spec_from_file_location("fullsize", REPO_ROOT / "bench" / "fullsize.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fullsize"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("fullsize", None)


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b", "chatglm-6b-int4"])
def test_full_size_layouts_have_the_loaders_keys_and_shapes(fullsize, name):
    layout = fullsize.LAYOUTS[name]
    config_class, model_class = model_classes(layout.family)
    with parameters_on_meta():
        model = model_class(config_class.from_dict(layout.config))
    # the rotary inv_freq buffers are stored by the original and recomputed by both
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    specs = fullsize.tensor_specs(layout, layout.config)
    stored = {s.name: s.shape for s in specs if not s.name.endswith("inv_freq")}
    if name == "chatglm-6b-int4":
        expected.pop("lm_head.weight")  # tied to the embedding and not stored in the int4 release
    assert stored == expected
    if name == "chatglm-6b":
        assert len(specs) == 368  # the published key count
    ranges = fullsize.split_shards([s.nbytes for s in specs], layout.shards)
    sizes = [sum(specs[i].nbytes for i in part) for part in ranges]
    assert len(sizes) == layout.shards and all(sizes)
    if layout.shards > 1:
        assert max(sizes) < 2.2e9  # THUDM's shards are under 2 GB


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b", "chatglm-6b-int4"])
def test_small_checkpoint_in_each_layout_loads_with_glmtune(fullsize, name, tmp_path):
    tokenizers = require_shared("reference", "vectors", "tokenizers")
    layout = fullsize.LAYOUTS[name]
    folder = fullsize.write_layout(name, tmp_path, SMALL[layout.family], tokenizers=tokenizers)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["num_layers"] == 2
    if layout.shards > 1:
        index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"pytorch_model-{i:05d}-of-{layout.shards:05d}.bin" for i in range(1, layout.shards + 1)]
        assert sorted(p.name for p in folder.glob("*.bin")) == files
        stored = {}
        for file_name in files:
            stored.update(torch.load(folder / file_name, weights_only=True))
        assert sorted(index["weight_map"]) == sorted(stored)
    else:
        assert [p.name for p in folder.glob("*.bin")] == ["pytorch_model.bin"]
        stored = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert not any(".scratch" in p.name or "writing" in p.name for p in tmp_path.rglob("*"))

    model = glmtune.load_model(folder)
    tokenizer = glmtune.load_tokenizer(folder)
    layer = model.transformer.layers[0] if layout.family == "v1" else model.transformer.encoder.layers[0]
    linear = layer.attention.query_key_value if layout.family == "v1" else layer.self_attention.query_key_value
    key = ("transformer.layers.0.attention" if layout.family == "v1"
           else "transformer.encoder.layers.0.self_attention") + ".query_key_value"
    if layout.bits:
        assert model.config.quantization_bit == 4 and isinstance(linear, QuantizedLinear)
        assert torch.equal(linear.weight, stored[f"{key}.weight"])
        weight = dequantize_weight(linear.weight, linear.weight_scale, 4)
        assert 0.005 < weight.float().std() < 0.1  # random int4 values at the scale's size
    else:
        assert torch.equal(linear.weight, stored[f"{key}.weight"]) and linear.weight.dtype == torch.float16
    if layout.family == "v1":  # the tied output layer: one tensor with the embedding's values
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
        if "lm_head.weight" in stored:
            assert torch.equal(stored["lm_head.weight"], stored["transformer.word_embeddings.weight"])
    ids = torch.tensor([tokenizer.encode("你好，世界")])
    with torch.no_grad():
        logits = model.float()(ids).logits
    assert logits.shape == (1, ids.shape[1], config.get("vocab_size", config.get("padded_vocab_size")))
    assert torch.isfinite(logits).all()


def test_a_written_checkpoint_is_reused_and_other_settings_get_their_own(fullsize, tmp_path):
    tokenizers = require_shared("reference", "vectors", "tokenizers")
    folder_name = fullsize._cache_folder(tmp_path, "chatglm2-6b", SMALL["v2"]).name
    abandoned = tmp_path / f".{folder_name}.writing-999999999-abc"  # a killed run's half-written copy
    abandoned.mkdir()
    first = fullsize.write_layout("chatglm2-6b", tmp_path, SMALL["v2"], tokenizers=tokenizers)
    assert not abandoned.exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = fullsize.write_layout("chatglm2-6b", tmp_path, SMALL["v2"], tokenizers=tokenizers)
    assert again == first and {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamps
    other = fullsize.write_layout("chatglm2-6b", tmp_path, {**SMALL["v2"], "num_layers": 1}, tokenizers=tokenizers)
    assert other != first and json.loads((other / "config.json").read_text())["num_layers"] == 1
