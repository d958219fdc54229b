"""Checkpoint I/O for both families: round trips, THUDM's layouts, clear errors, dtype, quantized, S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testkit import require_shared

from glmtune.errors import InvalidInputError
from glmtune.modeling import load_model, save_pretrained
from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.modeling.checkpoint import parameters_on_meta
from glmtune.modeling.quantization import QuantizedLinear
from glmtune.modeling.tiny import tiny_config


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    from glmtune.tokenization import load_tokenizer
    from glmtune.tokenization.tiny import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {family: load_tokenizer(train_tiny_tokenizer(family, root / family)) for family in ("v1", "v2")}


def random_model(family: str, tokenizers: dict, seed: int = 0, **overrides):
    """A tiny random model of `family` with the tiny tokenizer's vocabulary."""
    from glmtune.modeling.checkpoint import model_classes

    config = tiny_config(family, "tiny", tokenizers[family])
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return model_classes(family)[1](config).eval()


def saved(model, path: Path, **kwargs) -> Path:
    return save_pretrained(model, path, max_shard_size=kwargs.pop("max_shard_size", "100KB"), **kwargs)


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_sharded_safetensors_round_trip_is_bit_identical(tmp_path, tokenizers, family: str) -> None:
    model = random_model(family, tokenizers)
    out = saved(model, tmp_path / "ckpt", tokenizer=tokenizers[family])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / name).is_file() for name in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["architectures"] == ["ChatGLMForConditionalGeneration"]
    assert config["torch_dtype"] == "float32" and "dtype" not in config and "attn_impl" not in config
    if family == "v1":
        assert config["position_encoding_2d"] is True and config["bos_token_id"] == tokenizers["v1"].sop_token_id
        # THUDM's v1 checkpoint stores both; the original re-ties them when loading
        assert {"transformer.word_embeddings.weight", "lm_head.weight"} <= set(index["weight_map"])
    else:
        assert config["padded_vocab_size"] == len(tokenizers["v2"]) and "num_key_value_heads" not in config
        assert "transformer.output_layer.weight" in index["weight_map"]
    loaded = load_model(out)
    assert type(loaded) is type(model) and not loaded.training
    assert_same_state(model, loaded)
    if family == "v1":
        assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    from glmtune.tokenization import load_tokenizer

    assert load_tokenizer(out).family == family


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_pytorch_bin_shards_with_index_load(tmp_path, tokenizers, family: str) -> None:
    model = random_model(family, tokenizers)
    out = saved(model, tmp_path / "st")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((out / "config.json").read_text())
    weight_map = {}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        tensors = load_file(out / shard)
        torch.save(tensors, bin_dir / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_state(model, load_model(bin_dir))


def test_v1_reference_checkpoint_without_lm_head_ties_it_to_the_embeddings() -> None:
    model = load_model(require_shared("reference", "vectors", "chatglm6b_A"))
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_deleted_key_is_named(tmp_path, tokenizers) -> None:
    out = saved(random_model("v2", tokenizers), tmp_path / "ckpt", max_shard_size="10MB")
    tensors = load_file(out / "model.safetensors")
    del tensors["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match=r"missing keys.*transformer\.encoder\.layers\.1\.mlp\.dense_4h_to_h"):
        load_model(out)


def test_unexpected_key_is_named(tmp_path, tokenizers) -> None:
    out = saved(random_model("v2", tokenizers), tmp_path / "ckpt", max_shard_size="10MB")
    tensors = load_file(out / "model.safetensors")
    tensors["transformer.encoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match=r"unexpected keys.*layers\.0\.extra\.weight"):
        load_model(out)


def test_shape_mismatch_names_key_expected_and_found(tmp_path, tokenizers) -> None:
    out = saved(random_model("v2", tokenizers), tmp_path / "ckpt", max_shard_size="10MB")
    config = json.loads((out / "config.json").read_text())
    config["ffn_hidden_size"] = 100
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match=r"shape mismatch for transformer\.encoder\.layers\.0\.mlp\."
                                                r"dense_4h_to_h\.weight: the model expects \[64, 100\], "
                                                r"the checkpoint has \[64, 208\]"):
        load_model(out)


def test_old_150528_vocabulary_v1_checkpoint_says_what_to_do(tmp_path, tokenizers) -> None:
    out = saved(random_model("v1", tokenizers), tmp_path / "ckpt", max_shard_size="10MB")
    config = json.loads((out / "config.json").read_text())
    config.update(vocab_size=150528, bos_token_id=150004, eos_token_id=150005, pad_token_id=20003)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match=r"150528.*re-download THUDM/chatglm-6b"):
        load_model(out)


def test_unknown_architecture_and_missing_config_are_clear(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "chatglm",\n "hidden_size": 8,,\n}')
    with pytest.raises(InvalidInputError, match=r"config\.json:2: invalid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(InvalidInputError, match=r"unknown architecture \(model_type 'llama'\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_corrupt_shard_names_the_file(tmp_path, tokenizers, fmt: str) -> None:
    model = random_model("v2", tokenizers)
    out = saved(model, tmp_path / "ckpt", max_shard_size="10MB")
    if fmt == "bin":
        torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    weights = out / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InvalidInputError, match=rf"corrupt or unreadable weight file.*|{weights.name}") as err:
        load_model(out)
    assert str(weights) in str(err.value)


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_dtype_is_converted_on_load(tmp_path, tokenizers, dtype, expected) -> None:
    model = random_model("v2", tokenizers)
    loaded = load_model(saved(model, tmp_path / "ckpt"), dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {expected}
    embedding = loaded.get_input_embeddings().weight
    assert torch.equal(embedding, model.get_input_embeddings().weight.to(expected))


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_saves_and_loads_with_int_weights(tmp_path, tokenizers, family: str, bits: int) -> None:
    model = random_model(family, tokenizers).quantize(bits)
    out = saved(model, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["quantization_bit"] == bits
    loaded = load_model(out)
    assert loaded.config.quantization_bit == bits
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * 2 and all(layer.weight.dtype == torch.int8 for layer in layers)
    assert_same_state(model, loaded)
    tok = tokenizers[family]
    ids = torch.tensor([tok.build_inputs_with_special_tokens(tok.encode("你好", add_special_tokens=False))])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_quantization_bit_quantizes_a_float_checkpoint_on_load(tmp_path, tokenizers) -> None:
    loaded = load_model(saved(random_model("v2", tokenizers), tmp_path / "ckpt"), quantization_bit=8)
    assert loaded.config.quantization_bit == 8
    assert isinstance(loaded.transformer.encoder.layers[0].self_attention.query_key_value, QuantizedLinear)


def test_a_stored_quantized_checkpoint_cannot_be_loaded_at_another_precision(tmp_path, tokenizers) -> None:
    out = saved(random_model("v2", tokenizers).quantize(8), tmp_path / "ckpt")
    with pytest.raises(InvalidInputError, match="stored quantized to 8 bits; cannot load it in full precision"):
        load_model(out, quantization_bit=0)
    with pytest.raises(InvalidInputError, match="cannot load it as 4 bits"):
        load_model(out, quantization_bit=4)
    assert load_model(out, quantization_bit=8).config.quantization_bit == 8


def test_config_override_adds_a_fresh_trainable_prefix_encoder(tmp_path, tokenizers) -> None:
    model = random_model("v2", tokenizers)
    loaded = load_model(saved(model, tmp_path / "ckpt"), config_overrides={"pre_seq_len": 4})
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "transformer.prefix_encoder.embedding.weight"]
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(loaded.transformer.output_layer.weight, model.transformer.output_layer.weight)


def test_saving_over_a_checkpoint_replaces_old_shards_and_keeps_other_files(tmp_path, tokenizers) -> None:
    out = saved(random_model("v2", tokenizers), tmp_path / "ckpt", max_shard_size="100KB")
    (out / "README.md").write_text("notes")
    newer = random_model("v2", tokenizers, seed=1)
    save_pretrained(newer, out, max_shard_size="10MB")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    assert_same_state(newer, load_model(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_model_is_built_without_allocating_weights() -> None:
    with parameters_on_meta():
        model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(multi_query_attention=True, multi_query_group_num=2))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 6_000_000_000  # 24 GB in fp32 had it been allocated


def test_s3_uri_is_downloaded_and_loaded(tmp_path, tokenizers, s3_bucket: str) -> None:
    from glmtune.storage import upload_dir

    model = random_model("v2", tokenizers)
    upload_dir(saved(model, tmp_path / "ckpt"), f"s3://{s3_bucket}/runs/tiny")
    assert_same_state(model, load_model(f"s3://{s3_bucket}/runs/tiny"))


def test_saving_a_peft_wrapper_is_refused_without_writing(tmp_path, tokenizers) -> None:
    from peft import LoraConfig, TaskType, get_peft_model

    wrapped = get_peft_model(random_model("v2", tokenizers),
                             LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["query_key_value"]))
    with pytest.raises(InvalidInputError, match="merge_and_unload"):
        save_pretrained(wrapped, tmp_path / "out")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/Unix only")
@pytest.mark.parametrize(("dtype", "bits", "dropped"), [(None, None, False), ("float16", None, True), (None, 8, True)])
def test_weight_files_are_prefetched_and_converted_ones_dropped_from_the_cache(
        tmp_path, tokenizers, monkeypatch, dtype, bits, dropped: bool) -> None:
    """Every file gets WILLNEED before it is read; DONTNEED only after a file whose tensors were all copied
    (converted), since pages still mapped into the model cannot and should not go. Quantizing at load copies
    every tensor, even those kept as they are, so that no shard stays mapped next to the quantized model."""
    out = saved(random_model("v2", tokenizers), tmp_path / "ckpt")
    shards = {p.name for p in out.glob("model-*.safetensors")}
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    # a shard of only the rotary inv_freq buffers (skipped when loading) has nothing copied out of it
    converted = {name for key, name in weight_map.items() if not key.endswith("inv_freq")}
    calls: list[tuple[str, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    load_model(out, dtype=dtype, quantization_bit=bits)
    assert {name for name, advice in calls if advice == os.POSIX_FADV_WILLNEED} == shards
    assert {name for name, advice in calls if advice == os.POSIX_FADV_DONTNEED} == (converted if dropped else set())
    willneed = [name for name, advice in calls if advice == os.POSIX_FADV_WILLNEED]
    assert willneed == sorted(willneed)  # each file is prefetched as its turn comes, not all at once up front


def test_shard_writer_gives_an_oversized_tensor_a_shard_alone_and_refuses_a_key_twice(tmp_path) -> None:
    """The writer the streaming merge-export feeds tensor by tensor (and save_pretrained uses too)."""
    from glmtune.modeling.checkpoint import ShardWriter
    from glmtune.modeling.checkpoint_io import SAFE_INDEX

    writer = ShardWriter(tmp_path, limit=1000)
    writer.add("a", torch.zeros(100))  # 400 bytes
    writer.add("big", torch.ones(1000))  # 4000 bytes: over the limit, so alone
    writer.add("b", torch.zeros(100))
    with pytest.raises(InvalidInputError, match="twice"):
        writer.add("a", torch.zeros(1))
    names = writer.finish()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    assert index["weight_map"] == {"a": names[0], "big": names[1], "b": names[2]}
    assert index["metadata"]["total_size"] == 4800
    assert torch.equal(load_file(str(tmp_path / names[1]))["big"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, SAFE_INDEX])  # no temporary names left
