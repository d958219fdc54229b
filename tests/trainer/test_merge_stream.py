"""Streaming LoRA merge-export: the same tensors as the in-memory merge, original keys, shards within the limit."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from glmtune_trainer.checkpoint import RUN_FILE, WEIGHTS_FILE, save_weights
from glmtune_trainer.export import rebuild_trained_model
from glmtune_trainer.merge_stream import streaming_unsupported, write_merged
from glmtune_trainer.methods import apply_method

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.modeling import load_model, save_pretrained
from glmtune.modeling.checkpoint_io import SAFE_INDEX, weight_files
from glmtune.spec import MethodSpec


def _lora_checkpoint(base: Path, out: Path, dtype: str, **lora: Any) -> tuple[Path, dict[str, Any]]:
    """A trainer checkpoint (run.json + trained weights) of a LoRA over `base` with random, non-zero A and B
    (a fresh LoRA's B is zero, which would make any merge look right)."""
    method = MethodSpec.model_validate({"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, **lora}})
    model = apply_method(load_model(base, dtype=dtype), method, 10)
    generator = torch.Generator().manual_seed(0)
    trained = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            trained[name] = param
    out.mkdir(parents=True)
    save_weights(out / WEIGHTS_FILE, trained)
    run = {"base_model": str(base), "base_uri": str(base), "dtype": dtype, "total_steps": 10, "family": "v2",
           "template": "v2", "method": method.model_dump(mode="json"), "step": 10}
    storage.atomic_write_json(out / RUN_FILE, run)
    return out, run


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        found.update(load_file(str(path)))
    return found


def _in_memory_export(checkpoint: Path, run: dict[str, Any], out: Path, bits: int | None = None) -> Path:
    """What `export.write_export` does for a merged export: rebuild, peft merge_and_unload, save_pretrained."""
    model = rebuild_trained_model(checkpoint, run).merge_and_unload()
    if bits:
        model.quantize(bits)
    return save_pretrained(model, out)


CASES = {
    "v1-bf16-qkv": ("v1", "bfloat16", {}, None),
    "v2-fp32-all-linears-rslora": ("v2", "float32", {"targetModules": ["query_key_value", "dense", "dense_h_to_4h",
                                                                       "dense_4h_to_h"], "useRslora": True}, None),
    "v2-bf16-bias-all-int4": ("v2", "bfloat16", {"bias": "all"}, 4),
    "v1-fp16-lm-head-saved-int8": ("v1", "float16", {"modulesToSave": ["lm_head"]}, 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_merge_writes_exactly_the_in_memory_merge(tiny_model: Callable[[str], Path], tmp_path: Path,
                                                           case: str) -> None:
    family, dtype, lora, bits = CASES[case]
    checkpoint, run = _lora_checkpoint(tiny_model(family), tmp_path / "ckpt", dtype, **lora)
    expected_dir = _in_memory_export(checkpoint, run, tmp_path / "in-memory", bits)
    names = write_merged(checkpoint, tmp_path / "streamed", run, bits=bits)
    assert names == ["model.safetensors"]
    expected, streamed = _tensors(expected_dir), _tensors(tmp_path / "streamed")
    assert sorted(streamed) == sorted(expected)  # the original key names, no lora_* / base_layer keys left
    assert not any("lora" in key or "base_layer" in key for key in streamed)
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype, key
        assert torch.equal(streamed[key], tensor), key
    read = json.loads((tmp_path / "streamed" / "config.json").read_text())
    written = json.loads((expected_dir / "config.json").read_text())
    assert read == written


def test_a_streamed_merge_differs_from_the_base_where_lora_applies(tiny_model: Callable[[str], Path],
                                                                   tmp_path: Path) -> None:
    """Guards the comparison above: the merge really changes the targeted weights (and only those)."""
    base = tiny_model("v2")
    checkpoint, run = _lora_checkpoint(base, tmp_path / "ckpt", "float32")
    write_merged(checkpoint, tmp_path / "streamed", run)
    merged, original = _tensors(tmp_path / "streamed"), load_model(base, dtype="float32").state_dict()
    changed = {k for k, v in original.items() if k in merged and not torch.equal(merged[k], v)}
    assert changed and all(k.endswith("query_key_value.weight") for k in changed)


def test_streamed_shards_stay_within_the_limit_and_the_index_names_every_key(tiny_model: Callable[[str], Path],
                                                                           tmp_path: Path) -> None:
    from safetensors import safe_open

    checkpoint, run = _lora_checkpoint(tiny_model("v2"), tmp_path / "ckpt", "float32")
    limit = 64_000
    names = write_merged(checkpoint, tmp_path / "streamed", run, max_shard_size=limit)
    out = tmp_path / "streamed"
    assert len(names) > 3 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((out / SAFE_INDEX).read_text())
    seen = set()
    for name in names:
        with safe_open(str(out / name), "pt") as handle:
            sizes = [handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys()]
            assert sum(sizes) <= limit or len(sizes) == 1, (name, sizes)
            assert all(index["weight_map"][k] == name for k in handle.keys())
            seen.update(handle.keys())
    assert seen == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(out).values())
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no staging leftovers
    loaded = load_model(out)  # the loader reads the sharded export back
    assert loaded.config.num_layers == load_model(tiny_model("v2")).config.num_layers


def test_what_cannot_stream_is_named(tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    ada = {"method": {"name": "adalora"}}
    assert "adalora" in streaming_unsupported(ada)
    dora = {"method": {"name": "lora", "lora": {"useDora": True}}}
    assert "DoRA" in streaming_unsupported(dora)
    checkpoint, run = _lora_checkpoint(tiny_model("v2"), tmp_path / "ckpt", "float32")
    assert streaming_unsupported(run) is None
    with pytest.raises(InvalidInputError, match="DoRA"):
        write_merged(checkpoint, tmp_path / "out", {**run, **dora})
    quantized = tmp_path / "int4-base"
    save_pretrained(load_model(tiny_model("v2")).quantize(4), quantized)
    with pytest.raises(InvalidInputError, match="stored quantized"):
        write_merged(checkpoint, tmp_path / "out", {**run, "base_model": str(quantized)})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_streamed_merge_holds_about_one_shard_never_the_model(tiny_model: Callable[[str], Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Whenever a shard is written, the live float tensors are that shard plus a few tensors in flight (the
    stored one, its converted copy, a LoRA delta), far below the merged model: the base is never whole."""
    import gc
    import shutil

    from glmtune.modeling import checkpoint_save

    source = load_model(tiny_model("v2"), dtype="float32")
    source.config.num_layers = 48
    base = tmp_path / "base"
    save_pretrained(type(source)(source.config).eval(), base, max_shard_size="40KB")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (tiny_model("v2") / name).is_file():
            shutil.copyfile(tiny_model("v2") / name, base / name)
    checkpoint, run = _lora_checkpoint(base, tmp_path / "ckpt", "float32")
    before = {id(obj) for obj in gc.get_objects() if isinstance(obj, torch.Tensor)}
    live: list[int] = []
    real_flush = checkpoint_save.ShardWriter._flush

    def observed_flush(self: Any) -> None:
        live.append(sum(obj.numel() * obj.element_size() for obj in gc.get_objects()
                        if isinstance(obj, torch.Tensor) and id(obj) not in before and not obj.is_meta
                        and obj.is_floating_point() and obj.device.type == "cpu"))
        real_flush(self)

    monkeypatch.setattr(checkpoint_save.ShardWriter, "_flush", observed_flush)
    limit = 150_000
    write_merged(checkpoint, tmp_path / "streamed", run, max_shard_size=limit)
    merged = _tensors(tmp_path / "streamed")
    total = sum(t.numel() * t.element_size() for t in merged.values())
    largest = max(t.numel() * t.element_size() for t in merged.values())
    bound = limit + 3 * largest
    assert len(live) > 5 and total > 4 * bound, (len(live), total, bound)
    assert max(live) <= bound, (max(live), bound, total)
