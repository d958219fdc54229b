"""Quantize at load: a float checkpoint loaded with `quantization_bit` equals load-then-quantize, bit for bit,
and its float weights are quantized as they arrive instead of building the float model first."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.modeling import checkpoint as checkpoint_module
from glmtune.modeling import load_model, save_pretrained
from glmtune.modeling import quantization as quantization_module
from glmtune.modeling.checkpoint import model_classes
from glmtune.modeling.checkpoint_io import BIN_INDEX, SAFE_INDEX
from glmtune.modeling.quantization import QuantizedLinear
from glmtune.modeling.tiny import tiny_config


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    from glmtune.tokenization import load_tokenizer
    from glmtune.tokenization.tiny import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {family: load_tokenizer(train_tiny_tokenizer(family, root / family)) for family in ("v1", "v2")}


def float_checkpoint(family: str, tokenizers: dict, out: Path, layout: str, shard_size: str = "100KB",
                     num_layers: int | None = None) -> Path:
    """A tiny random float32 checkpoint in several shards, as safetensors or as torch .bin files."""
    torch.manual_seed(0)
    config = tiny_config(family, "tiny", tokenizers[family])
    config.num_layers = num_layers or config.num_layers
    model = model_classes(family)[1](config).eval()
    save_pretrained(model, out, max_shard_size=shard_size)
    if layout == "bin":
        index = json.loads((out / SAFE_INDEX).read_text())
        renamed = {}
        for name in sorted(set(index["weight_map"].values())):
            binary = name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            torch.save(load_file(str(out / name)), out / binary)
            (out / name).unlink()
            renamed[name] = binary
        index["weight_map"] = {key: renamed[name] for key, name in index["weight_map"].items()}
        (out / BIN_INDEX).write_text(json.dumps(index))
        (out / SAFE_INDEX).unlink()
    return out


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_quantize_at_load_equals_load_then_quantize(tmp_path, tokenizers, family: str, bits: int,
                                                    layout: str) -> None:
    folder = float_checkpoint(family, tokenizers, tmp_path / "ckpt", layout)
    dtype = "float16" if bits == 4 else None  # fp16 exercises the conversion before quantizing
    reference = load_model(folder, dtype=dtype).quantize(bits)
    loaded = load_model(folder, dtype=dtype, quantization_bit=bits)
    assert loaded.config.quantization_bit == bits and not loaded.training
    expected, got = reference.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert expected[key].dtype == got[key].dtype, key
        assert torch.equal(expected[key], got[key]), key
    for name, param in loaded.named_parameters():
        assert param.requires_grad == dict(reference.named_parameters())[name].requires_grad, name
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.bits == bits for m in layers)
    ids = tokenizers[family]("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded(ids).logits)


def _live_float_weights(shapes: set[tuple[int, ...]]) -> dict[int, int]:
    """Bytes by memory address of every live float tensor shaped like a quantized layer's float weight."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta and obj.is_floating_point() \
                and tuple(obj.shape) in shapes:
            seen[obj.data_ptr()] = obj.numel() * obj.element_size()
    return seen


def _live_float_bytes(shapes: set[tuple[int, ...]], before: set[int]) -> int:
    """Bytes of such tensors that were not alive before the load (other tests' models may share the shapes)."""
    return sum(size for address, size in _live_float_weights(shapes).items() if address not in before)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_quantize_at_load_never_holds_the_float_model(tmp_path, tokenizers, monkeypatch, layout: str) -> None:
    """At every quantization the live float weights of quantized layers fit in one shard (plus the converted
    copy being quantized), far below all of them: the float model is never built whole."""
    folder = float_checkpoint("v2", tokenizers, tmp_path / "ckpt", layout, shard_size="40KB", num_layers=12)
    probe = load_model(folder)
    suffixes = probe.quantized_modules
    weights = {name: m.weight for name, m in probe.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + s) for s in suffixes)}
    shapes = {tuple(w.shape) for w in weights.values()}
    total = sum(w.numel() * w.element_size() for w in weights.values())
    index = json.loads((folder / (SAFE_INDEX if layout == "safetensors" else BIN_INDEX)).read_text())
    per_shard: dict[str, int] = {}
    for key, shard in index["weight_map"].items():
        if key.removesuffix(".weight") in weights:
            per_shard[shard] = per_shard.get(shard, 0) + weights[key.removesuffix(".weight")].numel() * 4
    largest = max(w.numel() for w in weights.values()) * 2  # the fp16 copy being quantized
    bound = max(per_shard.values()) + largest
    # loaded whole, the float model holds `total` / 2 bytes (fp16): the check below tells one shard from all
    assert len(per_shard) >= 3 and total / 2 > 2 * bound, (total, bound)
    del probe, weights
    gc.collect()
    peaks: list[int] = []
    real = quantization_module.quantize_weight
    before = set(_live_float_weights(shapes))

    def observed(weight: torch.Tensor, bits: int, dtype: torch.dtype | None = None):
        peaks.append(_live_float_bytes(shapes, before))
        return real(weight, bits, dtype)

    # both namespaces: the load path's and the one model.quantize() goes through, so either path is measured
    monkeypatch.setattr(checkpoint_module, "quantize_weight", observed, raising=False)
    monkeypatch.setattr(quantization_module, "quantize_weight", observed)
    loaded = load_model(folder, dtype="float16", quantization_bit=4)
    assert loaded.config.quantization_bit == 4
    assert len(peaks) == len([m for m in loaded.modules() if isinstance(m, QuantizedLinear)])
    assert max(peaks) <= bound, (max(peaks), bound, total)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blockwise_quantization_gives_the_whole_weight_formulas_bits(bits: int, dtype: torch.dtype) -> None:
    """quantize_weight works QUANTIZE_ROWS rows at a time (for speed); across block edges, with a dtype
    conversion and an all-zero row, its bits are those of the original one-shot formula."""
    from glmtune.modeling.quantization import QUANTIZE_ROWS, pack_int4, quantize_weight

    weight = (torch.randn(2 * QUANTIZE_ROWS + 3, 64, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    weight[QUANTIZE_ROWS] = 0
    converted = weight.to(dtype)
    scale = (converted.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    values = torch.round(converted / torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]).to(torch.int8)
    qweight, got_scale = quantize_weight(weight, bits, dtype=dtype)
    assert torch.equal(got_scale, scale)
    assert torch.equal(qweight, pack_int4(values) if bits == 4 else values)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blockwise_dequantization_gives_the_one_shot_formulas_values(bits: int, dtype: torch.dtype) -> None:
    """dequantize_weight (what every training step through an int layer pays twice) works in row blocks;
    its values are the one-shot formula's: fp16 products for fp16, fp32 products rounded once otherwise."""
    from glmtune.modeling.quantization import QUANTIZE_ROWS, dequantize_weight, unpack_int4

    generator = torch.Generator().manual_seed(1)
    qweight = torch.randint(-128, 128, (2 * QUANTIZE_ROWS + 5, 32), dtype=torch.int8, generator=generator)
    scale = (torch.rand(qweight.shape[0], generator=generator) * 0.01).half()
    values = unpack_int4(qweight) if bits == 4 else qweight
    if dtype == torch.float16:
        expected = values.to(torch.float16) * scale[:, None]
    else:
        expected = (values.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)
    got = dequantize_weight(qweight, scale, bits, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)
