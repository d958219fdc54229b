"""Weight-only int8/int4 quantization: the chatglm-6b-int4 packing, accuracy, memory, and loading."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.modeling.quantization import (
    QuantizedLinear,
    dequantize_weight,
    pack_int4,
    quantize_model,
    quantize_weight,
    unpack_int4,
)

GMASK, SOP = 101, 104


def test_int4_packs_even_element_high_and_odd_element_low_with_sign():
    values = torch.tensor([[1, -2, -8, 7, 0, -1]], dtype=torch.int8)
    packed = pack_int4(values)
    # (1 << 4) | (-2 & 0xF) = 0x1E; (-8 << 4) | 7 = 0x87 as int8; (0 << 4) | 0xF = 0x0F
    assert packed.tolist() == [[0x1E, 0x87 - 256, 0x0F]]
    assert torch.equal(unpack_int4(packed), values)


def test_int4_packing_round_trips_every_pair_and_every_byte():
    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8).reshape(1, -1)
    assert torch.equal(unpack_int4(pack_int4(pairs)), pairs)
    every_byte = torch.arange(-128, 128, dtype=torch.int8)[None]
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_follows_the_original_formula(bits):
    torch.manual_seed(0)
    weight = torch.randn(16, 32).half()
    qweight, scale = quantize_weight(weight, bits)
    expected_scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    expected = torch.round(weight / expected_scale[:, None]).to(torch.int8)
    assert scale.dtype == torch.float16 and torch.equal(scale, expected_scale)
    assert qweight.dtype == torch.int8
    assert torch.equal(unpack_int4(qweight) if bits == 4 else qweight, expected)
    assert qweight.shape == (16, 32 * bits // 8)
    # dequantized fp16 weights are the fp16 products q * scale, within half a step of the input
    restored = dequantize_weight(qweight, scale, bits, torch.float16)
    assert torch.equal(restored, (expected.half() * expected_scale[:, None]))
    assert ((restored.float() - weight.float()).abs() <= scale.float()[:, None] / 2 + 1e-3).all()


def test_grid_values_and_zero_rows_survive_quantization_exactly():
    for bits in (8, 4):
        top = 2 ** (bits - 1) - 1
        values = torch.tensor([[-top, top, 3, -1], [top, -2, 0, 5], [0, 0, 0, 0]], dtype=torch.float32)
        weight = values * torch.tensor([0.5, 0.25, 0.0])[:, None]
        qweight, scale = quantize_weight(weight, bits)
        assert torch.equal(dequantize_weight(qweight, scale, bits, torch.float32), weight)


def tiny_model(hidden: int = 64) -> ChatGLMForConditionalGeneration:
    """hidden >= 64 so per-row statistics are meaningful; torch's default Linear init."""
    torch.manual_seed(0)
    config = ChatGLMConfig(vocab_size=256, hidden_size=hidden, num_layers=2, num_attention_heads=4,
                           inner_hidden_size=4 * hidden, bos_token_id=SOP, eos_token_id=105, mask_token_id=100,
                           gmask_token_id=GMASK, pad_token_id=3)
    model = ChatGLMForConditionalGeneration(config)
    with torch.no_grad():
        nn.init.normal_(model.transformer.word_embeddings.weight)
        for module in model.transformer.layers.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    return model.eval()


def prompt() -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(5, 100, (2, 16))
    ids[:, 10], ids[:, 11] = GMASK, SOP
    return ids


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.10)])
def test_quantized_forward_stays_close_to_float32(bits, bound):
    model = tiny_model()
    quantized = copy.deepcopy(model).quantize(bits)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 8
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, args, _o, name=name: seen.__setitem__(name, args[0])) for name in layers]
    ids = prompt()
    with torch.no_grad():
        reference = model(ids).logits
        logits = quantized(ids).logits
        for hook in hooks:
            hook.remove()
        for name, layer in layers.items():  # each layer on the activations it really sees
            float_layer = model.get_submodule(name)
            error = relative_error(layer(seen[name]) - layer.bias, float_layer(seen[name]) - float_layer.bias)
            assert error <= bound, f"{name}: relative error {error:.4f} > {bound}"
    assert relative_error(logits, reference) <= bound


@pytest.mark.parametrize("bits,ratio", [(8, 0.27), (4, 0.14)])
def test_quantized_weights_take_a_fraction_of_float32_memory(bits, ratio):
    model = tiny_model()
    float_bytes = sum(m.weight.nelement() * 4 for m in model.transformer.layers.modules() if isinstance(m, nn.Linear))
    model.quantize(bits)
    layers = [m for m in model.transformer.layers.modules() if isinstance(m, QuantizedLinear)]
    quant_bytes = sum(m.weight.nelement() * m.weight.element_size()
                      + m.weight_scale.nelement() * m.weight_scale.element_size() for m in layers)
    assert quant_bytes <= ratio * float_bytes


@pytest.mark.parametrize("bits", [8, 4])
def test_prequantized_state_dict_loads_into_a_model_built_with_quantization_bit(bits):
    model = tiny_model().quantize(bits)
    state = model.state_dict()
    prefix = "transformer.layers.0.attention.query_key_value"
    assert state[f"{prefix}.weight"].dtype == torch.int8
    assert state[f"{prefix}.weight"].shape == (3 * 64, 64 * bits // 8)
    assert state[f"{prefix}.weight_scale"].dtype == torch.float16
    assert state[f"{prefix}.weight_scale"].shape == (3 * 64,)
    assert model.config.quantization_bit == bits
    fresh = ChatGLMForConditionalGeneration(ChatGLMConfig(**model.config.to_dict())).eval()
    fresh.load_state_dict(state, strict=True)
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert torch.equal(fresh.generate(ids, do_sample=False, max_new_tokens=3),
                       model.generate(ids, do_sample=False, max_new_tokens=3))


def test_backward_through_int4_layers_matches_dequantized_float_layers():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    quantized = QuantizedLinear.from_linear(linear, 4)
    reference = nn.Linear(64, 32)
    with torch.no_grad():
        reference.weight.copy_(dequantize_weight(quantized.weight, quantized.weight_scale, 4, torch.float32))
        reference.bias.copy_(linear.bias)
    x1 = torch.randn(5, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    quantized(x1).square().sum().backward()
    reference(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert not quantized.weight.requires_grad and quantized.weight.grad is None


def test_quantize_model_replaces_only_the_named_linears():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attention = nn.Module()
            self.self_attention.query_key_value = nn.Linear(16, 48)
            self.self_attention.dense = nn.Linear(16, 16, bias=False)
            self.other = nn.Linear(16, 16)

    block = Block()
    replaced = quantize_model(block, 8, ["self_attention.query_key_value", "self_attention.dense"])
    assert replaced == 2
    assert isinstance(block.self_attention.query_key_value, QuantizedLinear)
    assert isinstance(block.self_attention.dense, QuantizedLinear) and block.self_attention.dense.bias is None
    assert isinstance(block.other, nn.Linear)


def test_unsupported_bit_widths_and_odd_int4_widths_are_rejected():
    with pytest.raises(InvalidInputError, match="4 or 8"):
        quantize_weight(torch.ones(2, 4), 3)
    with pytest.raises(InvalidInputError, match="even"):
        QuantizedLinear(5, 2, 4)
    with pytest.raises(InvalidInputError, match="already quantized"):
        tiny_model().quantize(8).quantize(4)
