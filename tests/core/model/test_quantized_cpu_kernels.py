"""CPU decoding of int8/int4 layers through torch's fused weight-only kernels (glmtune.modeling.quantization_cpu).

glmtune's own kernels, which take these calls first, are switched off here; test_cpu_kernels*.py covers them."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmtune import kernels
from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.modeling.quantization import QuantizedLinear, dequantize_weight
from glmtune.modeling.quantization_cpu import ENV_SWITCH, MAX_FUSED_ROWS, _warned

KERNELS = {8: "aten::_weight_int8pack_mm", 4: "aten::_weight_int4pack_mm_for_cpu"}
# bf16 results are compared within bf16 rounding (torch's own bf16 tolerance), fp32 ones within accumulation order
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (1e-3, 1e-3)}


@pytest.fixture(autouse=True)
def torch_kernels_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")


def ops_run(fn) -> tuple[object, set[str]]:
    """(fn(), names of the aten ops it ran), from torch's profiler rather than timing or counters."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {event.name for event in prof.events()}


def quantized_layer(in_features: int, out_features: int, bits: int, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    return QuantizedLinear.from_linear(nn.Linear(in_features, out_features), bits)


def dequantized_reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    weight = dequantize_weight(layer.weight, layer.weight_scale, layer.bits, x.dtype)
    return F.linear(x, weight) + layer.bias.to(x.dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,in_features,out_features", [
    (1, 64, 48), (1, 512, 512), (1, 96, 7), (4, 256, 130), (8, 128, 16), (8, 160, 333), (130, 64, 32)])
def test_fused_kernels_equal_dequantize_then_matmul(bits, dtype, rows, in_features, out_features):
    layer = quantized_layer(in_features, out_features, bits)
    torch.manual_seed(1)
    x = torch.randn(rows, in_features).to(dtype)
    with torch.no_grad():
        out, ops = ops_run(lambda: layer(x))
        expected = dequantized_reference(layer, x)
    assert (KERNELS[bits] in ops) == (rows <= MAX_FUSED_ROWS[dtype])
    assert out.dtype == dtype and out.shape == (rows, out_features)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=atol * expected.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_decoding_shaped_inputs_of_any_rank_take_the_fused_kernel(bits):
    layer = quantized_layer(128, 64, bits)
    x = torch.randn(1, 2, 128, dtype=torch.bfloat16)  # [seq, batch, hidden] as v1 decodes
    with torch.no_grad():
        out, ops = ops_run(lambda: layer(x))
        expected = dequantized_reference(layer, x)
    assert KERNELS[bits] in ops and out.shape == (1, 2, 64)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1.6e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
def test_training_long_prompts_and_the_env_switch_keep_dequantize_then_matmul(bits, monkeypatch):
    layer = quantized_layer(64, 32, bits)
    one = torch.randn(1, 64)
    _, ops = ops_run(lambda: layer(one))  # grad enabled: autograd's path
    assert KERNELS[bits] not in ops
    with torch.no_grad():
        _, ops = ops_run(lambda: layer(torch.randn(MAX_FUSED_ROWS[torch.bfloat16] + 1, 64, dtype=torch.bfloat16)))
        assert KERNELS[bits] not in ops
        _, ops = ops_run(lambda: layer(one))
        assert KERNELS[bits] in ops
        monkeypatch.setenv(ENV_SWITCH, "0")
        off, ops = ops_run(lambda: layer(one))
        assert KERNELS[bits] not in ops
        assert torch.equal(off, dequantized_reference(layer, one))


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_is_unchanged_by_fused_calls_and_new_weights_rebuild_the_cache(bits):
    layer = quantized_layer(64, 48, bits)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        layer(x.bfloat16())
    after = layer.state_dict()
    assert list(after) == ["weight", "weight_scale", "bias"]
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)._fused is None
    assert copy.deepcopy(layer)._fused is None
    # loading other weights in place (same storage, bumped version) must not reuse the old kernel layout
    other = quantized_layer(64, 48, bits, seed=7)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dequantized_reference(other, x), rtol=1e-5, atol=1e-5)


def test_widths_the_int4_kernel_lacks_fall_back_with_one_warning(caplog):
    layer = quantized_layer(48, 32, 4)  # 48 is not a multiple of the kernel's smallest group (32)
    x = torch.randn(1, 48)
    _warned.clear()
    with caplog.at_level(logging.WARNING, logger="glmtune.modeling.quantization_cpu"), torch.no_grad():
        first, ops = ops_run(lambda: layer(x))
        layer(x)
    assert KERNELS[4] not in ops
    assert [r.getMessage() for r in caplog.records].count(
        "fused CPU int8/int4 kernels not used: int4 needs in_features divisible by 32, got 48; "
        "falling back to dequantize + matmul") == 1
    assert torch.equal(first, dequantized_reference(layer, x))


def v1_model() -> ChatGLMForConditionalGeneration:
    config = ChatGLMConfig(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                           inner_hidden_size=256, bos_token_id=104, eos_token_id=105, mask_token_id=100,
                           gmask_token_id=101, pad_token_id=3)
    return ChatGLMForConditionalGeneration(config)


def v2_model() -> ChatGLM2ForConditionalGeneration:
    config = ChatGLM2Config(num_layers=2, padded_vocab_size=256, hidden_size=64, ffn_hidden_size=160, kv_channels=16,
                            num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2,
                            add_qkv_bias=True, seq_length=256, eos_token_id=2, pad_token_id=0)
    return ChatGLM2ForConditionalGeneration(config)


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_tokens_are_equal_with_the_fused_path_on_and_off(family, bits, monkeypatch):
    torch.manual_seed(0)
    model = (v1_model() if family == "v1" else v2_model()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.3)
    model.quantize(bits)
    ids = torch.randint(5, 99, (1, 12))
    if family == "v1":
        ids[0, -2:] = torch.tensor([101, 104])  # [gMASK] <sop>
    with torch.no_grad():
        fused, ops = ops_run(lambda: model.generate(ids, do_sample=False, max_new_tokens=8))
        assert KERNELS[bits] in ops
        monkeypatch.setenv(ENV_SWITCH, "0")
        plain, ops = ops_run(lambda: model.generate(ids, do_sample=False, max_new_tokens=8))
        assert KERNELS[bits] not in ops
    assert fused.shape[1] > ids.shape[1] and fused.tolist() == plain.tolist()
