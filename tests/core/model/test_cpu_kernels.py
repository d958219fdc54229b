"""glmtune's own CPU decode kernels (glmtune.kernels): int4 / int8 weight x int8-quantized activations, bf16 GEMV.

int4 / int8 are checked two ways: against an fp64 product of the SAME quantized activations (reproduced here from
the documented layout: blocks of 32 values, scale absmax / 127, round half to even), which they must equal up to
fp32 accumulation; and against the unquantized product, which they must match within the activation
quantization's error. bf16 must equal an fp64 product within one bf16 rounding of an fp32 sum.
"""

from __future__ import annotations

import pytest
import torch

from glmtune import kernels
from glmtune.modeling.quantization import quantize_weight, unpack_int4

ISAS = {"avx512": kernels.AVX512_VNNI, "avx2": kernels.AVX2}
# (rows, in_features, out_features): K a multiple of the 128-value chunk or not (even for int4), one output row
# or many, 1-4 rows (a decode step) and more (tiles of 4)
SHAPES = [(1, 4096, 67), (2, 256, 33), (3, 200, 37), (4, 130, 9), (1, 64, 5), (7, 384, 11), (1, 13696, 20)]
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(params=list(ISAS))
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each int4/int8 path this CPU has: AVX512-VNNI, and AVX2 (GLMTUNE_CPU_KERNELS=avx2) on the same CPU."""
    monkeypatch.setenv(kernels.ENV_SWITCH, "auto" if request.param == "avx512" else "avx2")
    if not kernels.features() & ISAS[request.param]:
        pytest.skip(f"no {request.param} kernel path here (CPU or build)")
    return request.param


def quantized_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The activations the int4/int8 kernels multiply, dequantized to fp64: per 128-value chunk in kernel order
    (int4: odd values first), 4-value lane i belongs to block i % 4; d = absmax / 127, q = round(x / d)."""
    rows, k = x.shape
    padded = -(-k // 128) * 128
    v = torch.zeros(rows, padded)
    v[:, :k] = x.float()
    if bits == 4:
        pairs = v.view(rows, -1, 64, 2)
        v = torch.cat((pairs[..., 1], pairs[..., 0]), dim=-1).reshape(rows, padded)
    blocks = v.view(rows, -1, 8, 4, 4).transpose(2, 3)  # [rows, chunk, block, 8 lanes, 4 values]
    d = (blocks.abs().amax(dim=(-1, -2)) / 127)[..., None, None]
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d > 0, torch.round(blocks / safe).clamp(-127, 127), torch.zeros_like(blocks))
    deq = (q.double() * d.double()).transpose(2, 3).reshape(rows, padded)
    if bits == 4:
        halves = deq.view(rows, -1, 2, 64)
        deq = torch.stack((halves[:, :, 1], halves[:, :, 0]), dim=-1).reshape(rows, padded)
    return deq[:, :k]


def weight_values(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return (unpack_int4(qweight) if bits == 4 else qweight).double() * scale.double()[:, None]


def run(bits: int, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    call = kernels.int4_linear if bits == 4 else kernels.int8_linear
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = call(x, qweight, scale, bias)
    assert f"glmtune::int{bits}_linear" in {event.name for event in prof.events()}
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_quantized_kernels_equal_fp64_on_the_same_quantized_activations(isa, bits, dtype, rows, k, n):
    torch.manual_seed(rows * 1000 + k + n)
    qweight, scale = quantize_weight(torch.randn(n, k), bits)
    if bits == 8 and isa == "avx512":
        qweight[0, :5] = -128  # outside THUDM's +-127, but the VNNI kernel takes the full int8 range
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(n).to(dtype) if n % 2 else None
    out = run(bits, x, qweight, scale, bias)
    assert out.dtype == dtype and out.shape == (rows, n)
    xq, w = quantized_activations(x, bits), weight_values(qweight, scale, bits)
    expected = xq @ w.T + (bias.double() if bias is not None else 0)
    # fp32 sums of K products (of unsigned weights s + 8 / w + 128, corrected once) differ from fp64 by ~1e-7 of
    # the summed magnitudes; then one rounding to the output dtype
    magnitude = xq.abs() @ (w.abs() + (8 if bits == 4 else 128) * scale.double()[:, None]).T
    allowed = 4e-6 * magnitude + OUTPUT_ROUNDING[dtype] * expected.abs() + 1e-30
    assert ((out.double() - expected).abs() <= allowed).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kernels_match_the_unquantized_product_within_int8_activation_error(isa, bits):
    torch.manual_seed(bits)
    qweight, scale = quantize_weight(torch.randn(512, 4096), bits)
    x = torch.randn(2, 4096)
    out = run(bits, x, qweight, scale, None)
    exact = x.double() @ weight_values(qweight, scale, bits).T
    # int8 activations in blocks of 32 (q8_0): ~0.5% relative error for Gaussian activations
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.01


@pytest.mark.parametrize("bits", [4, 8])
def test_three_dimensional_and_non_contiguous_inputs(isa, bits):
    torch.manual_seed(3)
    qweight, scale = quantize_weight(torch.randn(24, 256), bits)
    base = torch.randn(1, 2, 512)
    x = base[..., ::2]  # [1, 2, 256], every other value: not contiguous
    out = run(bits, x, qweight, scale, None)
    assert out.shape == (1, 2, 24)
    expected = run(bits, x.contiguous().reshape(2, 256), qweight, scale, None)
    assert torch.equal(out.reshape(2, 24), expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_avx2_and_avx512_paths_give_the_same_result_to_fp32_rounding(bits, monkeypatch):
    if kernels.features() & (kernels.AVX512_VNNI | kernels.AVX2) != (kernels.AVX512_VNNI | kernels.AVX2):
        pytest.skip("this CPU lacks one of the two paths")
    torch.manual_seed(5)
    qweight, scale = quantize_weight(torch.randn(40, 1000), bits)
    x = torch.randn(3, 1000)
    wide = run(bits, x, qweight, scale, None)
    monkeypatch.setenv(kernels.ENV_SWITCH, "avx2")
    narrow = run(bits, x, qweight, scale, None)
    torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-4)


def test_a_nan_activation_makes_its_row_nan_and_leaves_the_others(isa):
    qweight, scale = quantize_weight(torch.randn(8, 256), 4)
    x = torch.randn(2, 256)
    x[1, 7] = float("nan")
    out = run(4, x, qweight, scale, None)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.fixture
def bf16_kernel() -> None:
    if not kernels.features() & kernels.AVX512_BF16:
        pytest.skip("no AVX512-BF16 here")


@pytest.mark.parametrize("rows,k,n", [(1, 4096, 67), (2, 31, 3), (3, 200, 37), (4, 33, 9), (7, 64, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_kernel_equals_fp64_within_bf16_rounding(bf16_kernel, rows, k, n, with_bias):
    torch.manual_seed(k + n)
    weight, x = torch.randn(n, k).bfloat16(), torch.randn(rows, k).bfloat16()
    bias = torch.randn(n).bfloat16() if with_bias else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = kernels.bf16_linear(x, weight, bias)
    assert "glmtune::bf16_linear" in {event.name for event in prof.events()}
    expected = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    magnitude = x.double().abs() @ weight.double().abs().T
    assert out.dtype == torch.bfloat16
    assert ((out.double() - expected).abs() <= 2.0**-8 * expected.abs() + 1e-6 * magnitude).all()


def test_kernel_calls_with_wrong_tensors_raise_instead_of_reading_out_of_bounds():
    if not kernels.features():
        pytest.skip("no kernels here")
    qweight, scale = quantize_weight(torch.randn(8, 64), 4)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.glmtune.int4_linear(torch.randn(1, 66), qweight, scale, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.glmtune.int4_linear(torch.randn(1, 64), qweight.t(), scale, None)
    with pytest.raises(RuntimeError, match="values for"):
        torch.ops.glmtune.int4_linear(torch.randn(1, 64), qweight, scale, torch.zeros(3))
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.glmtune.int8_linear(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int16), scale, None)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_scales_converted_by_a_model_to_call_give_the_same_result(isa, scale_dtype):
    qweight, scale = quantize_weight(torch.randn(16, 256), 4)
    scale = scale.to(scale_dtype)  # what model.to(dtype) does to a QuantizedLinear's weight_scale
    x = torch.randn(2, 256)
    expected = quantized_activations(x, 4) @ weight_values(qweight, scale, 4).T
    out = run(4, x, qweight, scale, None)
    assert ((out.double() - expected).abs() <= 1e-5 * expected.abs().max()).all()
