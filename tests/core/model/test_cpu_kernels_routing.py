"""Which calls take glmtune's CPU kernels (QuantizedLinear decode steps, bf16 Linears and the output layer in
inference) and which keep torch's, and that the switches and fallbacks give torch's own results."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmtune import kernels
from glmtune.errors import InvalidInputError
from glmtune.modeling import quantization_cpu
from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.modeling.projection import project_to_vocab
from glmtune.modeling.quantization import QuantizedLinear, dequantize_weight

OURS = {4: "glmtune::int4_linear", 8: "glmtune::int8_linear", 16: "glmtune::bf16_linear"}
TORCH = {4: "aten::_weight_int4pack_mm_for_cpu", 8: "aten::_weight_int8pack_mm"}


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    monkeypatch.delenv(quantization_cpu.ENV_SWITCH, raising=False)
    if not kernels.features() & (kernels.AVX512_VNNI | kernels.AVX2):
        pytest.skip("glmtune's CPU kernels do not run here")


def ops_run(fn) -> tuple[object, set[str]]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {event.name for event in prof.events()}


def quantized_layer(bits: int, k: int = 256, n: int = 96, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    return QuantizedLinear.from_linear(nn.Linear(k, n), bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_of_quantized_layers_take_glmtune_kernels(bits, dtype):
    layer = quantized_layer(bits)
    x = torch.randn(1, 3, 256, dtype=dtype)
    with torch.no_grad():
        out, ops = ops_run(lambda: layer(x))
        exact = F.linear(x.double(), dequantize_weight(layer.weight, layer.weight_scale, bits, torch.float64),
                         layer.bias.double())
    assert OURS[bits] in ops and TORCH[bits] not in ops
    assert out.dtype == dtype and out.shape == (1, 3, 96)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.015  # int8 activations (+ bf16 rounding)


def test_int4_never_builds_torchs_second_copy_of_the_weight():
    layer = quantized_layer(4)
    with torch.no_grad():
        _, ops = ops_run(lambda: layer(torch.randn(16, 256, dtype=torch.bfloat16)))  # a short prompt
        layer(torch.randn(1, 256, dtype=torch.bfloat16))
    assert OURS[4] in ops and TORCH[4] not in ops
    assert layer._fused.int4_weight is None


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_up_to_own_kernel_rows_take_glmtune_kernels_and_longer_ones_dequantize(bits, dtype):
    layer = quantized_layer(bits)
    with torch.no_grad():
        _, ops = ops_run(lambda: layer(torch.randn(quantization_cpu.OWN_KERNEL_ROWS, 256, dtype=dtype)))
        assert OURS[bits] in ops and TORCH[bits] not in ops
        _, ops = ops_run(lambda: layer(torch.randn(quantization_cpu.OWN_KERNEL_ROWS + 1, 256, dtype=dtype)))
        assert OURS[bits] not in ops and TORCH[bits] not in ops


@pytest.mark.parametrize("bits", [4, 8])
def test_switched_off_the_layer_gives_torchs_kernel_result(bits, monkeypatch):
    layer = quantized_layer(bits)
    x = torch.randn(2, 256)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    with torch.no_grad():
        out, ops = ops_run(lambda: layer(x))
    assert TORCH[bits] in ops and OURS[bits] not in ops
    if bits == 8:
        direct = torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.weight_scale.float()) + layer.bias
        assert torch.equal(out, direct)


def test_fused_quant_switch_turns_off_glmtune_kernels_too(monkeypatch):
    layer = quantized_layer(4)
    x = torch.randn(1, 256)
    monkeypatch.setenv(quantization_cpu.ENV_SWITCH, "0")
    with torch.no_grad():
        out, ops = ops_run(lambda: layer(x))
    assert OURS[4] not in ops and TORCH[4] not in ops
    weight = dequantize_weight(layer.weight, layer.weight_scale, 4, torch.float32)
    assert torch.equal(out, F.linear(x, weight) + layer.bias)


def test_an_int8_weight_holding_minus_128_keeps_torchs_kernel_on_the_avx2_path_with_one_warning(monkeypatch, caplog):
    layer = quantized_layer(8)
    with torch.no_grad():
        layer.weight[3, 5] = -128
    monkeypatch.setenv(kernels.ENV_SWITCH, "avx2")
    quantization_cpu._warned.clear()
    with caplog.at_level(logging.WARNING, logger="glmtune.modeling.quantization_cpu"), torch.no_grad():
        _, ops = ops_run(lambda: layer(torch.randn(1, 256)))
        layer(torch.randn(1, 256))
    assert TORCH[8] in ops and OURS[8] not in ops
    assert sum("-128" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    if kernels.features() & kernels.AVX512_VNNI:  # the VNNI kernel takes the full int8 range
        with torch.no_grad():
            _, ops = ops_run(lambda: layer(torch.randn(1, 256)))
        assert OURS[8] in ops


def test_an_unknown_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "fast")
    with pytest.raises(InvalidInputError, match="GLMTUNE_CPU_KERNELS"):
        kernels.features()


@pytest.fixture
def bf16_kernel() -> None:
    if not kernels.features() & kernels.AVX512_BF16:
        pytest.skip("no AVX512-BF16 here")


def test_decode_linear_routes_only_plain_bf16_inference_decode_calls(bf16_kernel):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).bfloat16()
    x = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ops = ops_run(lambda: kernels.decode_linear(linear, x))
        assert OURS[16] in ops
        torch.testing.assert_close(out, linear(x), rtol=2**-7, atol=1e-2)
        _, ops = ops_run(lambda: kernels.decode_linear(linear, torch.randn(kernels.MAX_ROWS + 1, 64).bfloat16()))
        assert OURS[16] not in ops
        fp32 = nn.Linear(64, 48)
        _, ops = ops_run(lambda: kernels.decode_linear(fp32, x.float()))
        assert OURS[16] not in ops
        seen = []
        handle = linear.register_forward_hook(lambda _m, _a, output: seen.append(output))
        _, ops = ops_run(lambda: kernels.decode_linear(linear, x))
        handle.remove()
        assert OURS[16] not in ops and len(seen) == 1  # a user's hook still sees the call
    _, ops = ops_run(lambda: kernels.decode_linear(linear, x))  # grad enabled: autograd's path
    assert OURS[16] not in ops


def test_bf16_output_layer_takes_the_kernel(bf16_kernel):
    head = nn.Linear(64, 20000, bias=False).bfloat16()
    hidden = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        logits, ops = ops_run(lambda: project_to_vocab(hidden, head))
        torch.testing.assert_close(logits, head(hidden), rtol=2**-7, atol=1e-2)
    assert OURS[16] in ops


def v1_model() -> ChatGLMForConditionalGeneration:
    return ChatGLMForConditionalGeneration(ChatGLMConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256, bos_token_id=104,
        eos_token_id=105, mask_token_id=100, gmask_token_id=101, pad_token_id=3))


def v2_model() -> ChatGLM2ForConditionalGeneration:
    return ChatGLM2ForConditionalGeneration(ChatGLM2Config(
        num_layers=2, padded_vocab_size=256, hidden_size=64, ffn_hidden_size=160, kv_channels=16,
        num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
        seq_length=256, eos_token_id=2, pad_token_id=0))


def decode_step_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the first decode step after the prompt (the prompt itself runs the multi-row paths)."""
    out = model.generate(ids, do_sample=False, max_new_tokens=2, min_new_tokens=2, output_logits=True,
                         return_dict_in_generate=True)
    return out.logits[1][0].float()


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_model_decode_steps_run_glmtune_kernels_and_match_torchs_logits(family, bits, monkeypatch):
    if bits == 16 and not kernels.features() & kernels.AVX512_BF16:
        pytest.skip("no AVX512-BF16 here")
    torch.manual_seed(0)
    model = (v1_model() if family == "v1" else v2_model()).eval()
    if bits == 16:
        model = model.bfloat16()
    else:
        model.quantize(bits)
    ids = torch.randint(5, 99, (1, 10))
    if family == "v1":
        ids[0, -2:] = torch.tensor([101, 104])  # [gMASK] <sop>
    with torch.no_grad():
        ours, ops = ops_run(lambda: decode_step_logits(model, ids))
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        theirs, torch_ops = ops_run(lambda: decode_step_logits(model, ids))
    assert OURS[bits] in ops and not any(name.startswith("glmtune::") for name in torch_ops)
    # int8 activations: ~0.5% per layer; bf16: rounding in a different order
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.03
